"""The Helm chart (deploy/helm/stowage): lint, the contract of what it renders, and its
acceptance by a real kube-apiserver (CRDs applied for real, everything else as a server-side
dry-run, the operator's and the node agent's RBAC applied and asked with ``kubectl auth
can-i``).

The ServiceMonitor and cert-manager kinds are optional: their CRDs do not come with the
chart, so the test that renders them installs minimal stand-in CRDs first (any object of the
kind is accepted; the rest of that rendering is checked in full).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stowage.agent.mirror import MirroredRegistry
from tests.support.kube import KubeAPI

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "stowage"
HELM = ROOT / ".cache" / "bin" / "helm"
DOCS = ROOT / "docs" / "helm.md"
RELEASE = "stowage"
NAMESPACE = "stowage"  # release namespace of the offline renders

Doc = dict[str, Any]

CERT_MANAGER: dict[str, Any] = {"webhook": {"certManager": {"enabled": True}}}
SERVICE_MONITOR: dict[str, Any] = {"serviceMonitor": {"enabled": True}}
HOST_PATH: dict[str, Any] = {"proxy": {"data": {"type": "hostPath"}}}
AGENT_OPTIONS: dict[str, Any] = {
    "agent": {
        "mirror": {"registries": ["docker.io", "http://registry.local:5000"]},
        "startupTaint": True,
        "readPullSecrets": True,
    }
}
OPTIONS: dict[str, Any] = {
    "webhook": {"certManager": {"enabled": True}},
    "serviceMonitor": {"enabled": True},
    "cache": {
        "authSecret": "regcred",
        "insecureRegistries": ["registry.local:5000"],
        "tagTTL": 600,
        "storage": {"storageClassName": "fast"},
    },
    "operator": {"include": [r"^docker\.io/"], "exclude": [r"^registry\.internal/"]},
    **AGENT_OPTIONS,
}

STOWAGE_CRDS = (
    "cachedimages.stowage.dev",
    "clusterkopfpeerings.kopf.dev",
    "imagecaches.stowage.dev",
)


# --- helm ---------------------------------------------------------------------------------


class Helm:
    """The helm binary with its own config, cache and data directories."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        self._values = 0
        self._renders: dict[str, list[Doc]] = {}

    def run(
        self, *args: str, values: dict[str, Any] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(HELM), *args]
        if values:
            self._values += 1
            path = self.home / f"values-{self._values}.yaml"
            path.write_text(json.dumps(values))  # JSON is YAML
            cmd += ["-f", str(path)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env=self.env, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} -> {proc.returncode}:\n{proc.stderr}")
        return proc

    def template(
        self,
        values: dict[str, Any] | None = None,
        *,
        namespace: str = NAMESPACE,
        release: str = RELEASE,
        include_crds: bool = False,
    ) -> list[Doc]:
        """``helm template`` parsed into its objects (cached per arguments)."""
        key = json.dumps([values, namespace, release, include_crds], sort_keys=True)
        if key not in self._renders:
            args = ["template", release, str(CHART), "--namespace", namespace]
            if include_crds:
                args.append("--include-crds")
            out = self.run(*args, values=values).stdout
            self._renders[key] = [d for d in yaml.safe_load_all(out) if d]
        return copy.deepcopy(self._renders[key])


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    if not HELM.exists():
        pytest.skip("missing .cache/bin/helm (scripts/build-test-binaries.sh builds it)")
    return Helm(tmp_path_factory.mktemp("helm"))


# --- helpers --------------------------------------------------------------------------------


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: Doc, name: str) -> Doc:
    (found,) = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    return found


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def runs_as_non_root(workload: Doc, c: Doc) -> bool:
    pod_ctx = pod_spec(workload).get("securityContext", {})
    ctx = {**pod_ctx, **c.get("securityContext", {})}
    return ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 1) != 0


CACHE_URL = f"http://{RELEASE}-cache.{NAMESPACE}.svc:7439"

AGENT_OBJECTS = [
    ("ServiceAccount", "stowage-agent"),
    ("ClusterRole", "stowage-agent"),
    ("ClusterRoleBinding", "stowage-agent"),
    ("DaemonSet", "stowage-agent"),
]


# --- the chart itself ---------------------------------------------------------------------------


def test_chart_metadata_follows_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "stowage"
    assert chart["appVersion"] == project["version"]


@pytest.mark.parametrize(
    "values",
    [
        None,
        merged(CERT_MANAGER, SERVICE_MONITOR),
        merged(OPTIONS, HOST_PATH, {"operator": {"replicas": 1}}),
    ],
    ids=["defaults", "cert-manager+servicemonitor", "all-options"],
)
def test_helm_lint(helm: Helm, values: dict[str, Any] | None) -> None:
    proc = helm.run("lint", "--strict", str(CHART), values=values, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_default_render_has_exactly_these_objects(helm: Helm) -> None:
    docs = helm.template()
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        [
            ("ServiceAccount", "stowage-operator"),
            ("ServiceAccount", "stowage-registry"),
            ("ClusterRole", "stowage-operator"),
            ("ClusterRoleBinding", "stowage-operator"),
            ("Role", "stowage-operator"),
            ("RoleBinding", "stowage-operator"),
            ("Deployment", "stowage-operator"),
            ("PodDisruptionBudget", "stowage-operator"),
            ("Service", "stowage-webhook"),
            ("MutatingWebhookConfiguration", "stowage"),
            ("DaemonSet", "stowage-proxy"),
            ("StatefulSet", "stowage-cache"),
            ("Service", "stowage-cache"),
            ("Secret", "stowage-cache-admin"),
            ("ClusterKopfPeering", "stowage"),
            *AGENT_OBJECTS,
        ]
    )
    cluster_scoped = {
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
        "ClusterKopfPeering",
    }
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert d["metadata"].get("namespace") == (
            None if d["kind"] in cluster_scoped else NAMESPACE
        )
    # The CRDs come with --include-crds (helm install applies them first).
    crds = of_kind(helm.template(include_crds=True), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == sorted(STOWAGE_CRDS)
    # agent.enabled=false leaves out the agent's objects, and only them.
    without = helm.template({"agent": {"enabled": False}})
    assert sorted((d["kind"], d["metadata"]["name"]) for d in without) == sorted(
        set((d["kind"], d["metadata"]["name"]) for d in docs) - set(AGENT_OBJECTS)
    )


# --- the webhook ----------------------------------------------------------------------------


def test_webhook_contract(helm: Helm) -> None:
    docs = helm.template()
    config = one(docs, "MutatingWebhookConfiguration", RELEASE)
    (hook,) = config["webhooks"]
    assert hook["name"] == "pods.stowage.dev"
    assert hook["failurePolicy"] == "Ignore"  # never blocks a pod
    assert 1 <= hook["timeoutSeconds"] <= 10
    assert hook["timeoutSeconds"] == 5
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert "caBundle" not in hook["clientConfig"]  # the operator patches it in
    assert "annotations" not in config["metadata"]
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        },
        {  # kubectl debug
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["UPDATE"],
            "resources": ["pods/ephemeralcontainers"],
            "scope": "Namespaced",
        },
    ]
    assert hook["clientConfig"]["service"] == {
        "name": "stowage-webhook",
        "namespace": NAMESPACE,
        "path": "/mutate-pods",
        "port": 443,
    }
    assert hook["objectSelector"] == {
        "matchExpressions": [
            {"key": "stowage.dev/image-caching", "operator": "NotIn", "values": ["ignore"]}
        ]
    }
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name"
    assert expr["operator"] == "NotIn"
    assert sorted(expr["values"]) == ["kube-system", NAMESPACE]

    # The Service in front of it: 443 to the operator's webhook port.
    service = one(docs, "Service", "stowage-webhook")
    assert service["spec"]["ports"] == [
        {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}
    ]
    operator = one(docs, "Deployment", "stowage-operator")
    assert service["spec"]["selector"].items() <= (
        operator["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = {p["name"]: p["containerPort"] for p in container(operator, "operator")["ports"]}
    assert ports["webhook"] == 8443


def test_ignored_namespaces_follow_values(helm: Helm) -> None:
    values = {"operator": {"ignoredNamespaces": ["kube-system", "monitoring", "infra"]}}
    docs = helm.template(values, namespace="infra")
    (hook,) = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["values"] == ["kube-system", "monitoring", "infra"]  # no duplicate
    args = container(one(docs, "Deployment"), "operator")["args"]
    assert [a for a in args if a.startswith("--ignore-namespace=")] == [
        "--ignore-namespace=kube-system",
        "--ignore-namespace=monitoring",
        "--ignore-namespace=infra",
    ]
    assert "--namespace=infra" in args
    # An empty list is the release namespace alone, for the operator as for the webhook
    # (without the flag the operator would fall back to its default, kube-system).
    docs = helm.template({"operator": {"ignoredNamespaces": []}}, namespace="infra")
    (hook,) = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["infra"]
    args = container(one(docs, "Deployment"), "operator")["args"]
    assert [a for a in args if a.startswith("--ignore-namespace=")] == ["--ignore-namespace=infra"]


def test_an_existing_operator_service_account_must_be_named(helm: Helm) -> None:
    with pytest.raises(AssertionError, match=r"operator\.serviceAccount\.name"):
        helm.template({"operator": {"serviceAccount": {"create": False}}})
    docs = helm.template({"operator": {"serviceAccount": {"create": False, "name": "ops"}}})
    assert pod_spec(one(docs, "Deployment"))["serviceAccountName"] == "ops"
    assert not [sa for sa in of_kind(docs, "ServiceAccount") if sa["metadata"]["name"] == "ops"]
    for binding in of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding"):
        if binding["metadata"]["name"] == "stowage-operator":
            assert binding["subjects"][0]["name"] == "ops"


def test_webhook_with_cert_manager(helm: Helm) -> None:
    docs = helm.template(CERT_MANAGER)
    config = one(docs, "MutatingWebhookConfiguration", RELEASE)
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/stowage-webhook"
    }
    issuer = one(docs, "Issuer", "stowage-selfsigned")
    assert issuer["spec"] == {"selfSigned": {}}
    cert = one(docs, "Certificate", "stowage-webhook")
    assert cert["spec"]["secretName"] == "stowage-webhook-cert"
    assert cert["spec"]["issuerRef"] == {
        "name": "stowage-selfsigned",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    assert sorted(cert["spec"]["dnsNames"]) == sorted(
        [
            "stowage-webhook",
            f"stowage-webhook.{NAMESPACE}",
            f"stowage-webhook.{NAMESPACE}.svc",
            f"stowage-webhook.{NAMESPACE}.svc.cluster.local",
        ]
    )
    operator = one(docs, "Deployment", "stowage-operator")
    op = container(operator, "operator")
    assert "--cert-dir=/etc/stowage/webhook-tls" in op["args"]
    assert not [a for a in op["args"] if a.startswith(("--cert-secret", "--webhook-config"))]
    mount = {m["name"]: m for m in op["volumeMounts"]}["webhook-tls"]
    assert mount == {
        "name": "webhook-tls",
        "mountPath": "/etc/stowage/webhook-tls",
        "readOnly": True,
    }
    volume = {v["name"]: v for v in pod_spec(operator)["volumes"]}["webhook-tls"]
    assert volume["secret"]["secretName"] == "stowage-webhook-cert"
    # Nothing left for the operator to do with Secrets or webhook configurations.
    assert not of_kind(docs, "Role")
    rules = one(docs, "ClusterRole", "stowage-operator")["rules"]
    assert not [r for r in rules if "mutatingwebhookconfigurations" in r["resources"]]

    # A given issuer instead of the self-signed one.
    values = merged(CERT_MANAGER, {"webhook": {"certManager": {"issuerRef": {"name": "ca"}}}})
    docs = helm.template(values)
    assert not of_kind(docs, "Issuer")
    assert one(docs, "Certificate")["spec"]["issuerRef"] == {
        "name": "ca",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }


# --- the workloads -------------------------------------------------------------------------


def test_operator_deployment(helm: Helm) -> None:
    docs = helm.template()
    operator = one(docs, "Deployment", "stowage-operator")
    assert operator["spec"]["replicas"] == 2
    spec = pod_spec(operator)
    assert spec["serviceAccountName"] == "stowage-operator"
    op = container(operator, "operator")
    assert op["args"] == [
        "operator",
        f"--namespace={NAMESPACE}",
        "--proxy-address=localhost:7439",
        f"--cache-url={CACHE_URL}",
        "--cache-token-file=/etc/stowage/cache-admin/token",
        "--expiry=30d",
        "--ignore-namespace=kube-system",
        f"--ignore-namespace={NAMESPACE}",
        "--platform=linux/amd64",
        "--freshness-interval=1h",
        "--webhook-listen=0.0.0.0:8443",
        "--webhook-service=stowage-webhook",
        "--webhook-config=stowage",
        "--cert-secret=stowage-webhook-tls",
        "--health-listen=0.0.0.0:8080",
        "--metrics-listen=0.0.0.0:9090",
        "--peering=stowage",
        "--log-level=info",
        "--log-format=json",
    ]
    env = {e["name"]: e for e in op["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert one(docs, "ClusterKopfPeering", RELEASE)["apiVersion"] == "kopf.dev/v1"
    for probe in ("livenessProbe", "readinessProbe"):
        assert op[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in op["ports"]}["health"] == 8080
    assert op["resources"]["requests"] and op["resources"]["limits"]["memory"]
    # Replicas spread across nodes, and a disruption leaves one.
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = operator["spec"]["selector"]["matchLabels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    pdb = one(docs, "PodDisruptionBudget", "stowage-operator")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}


def test_operator_values_become_args(helm: Helm) -> None:
    values = {
        "operator": {
            "replicas": 1,
            "expiry": "12h",
            "include": [r"^docker\.io/", "^ghcr.io/org/"],
            "exclude": [r"^registry\.internal/"],
            "platforms": ["linux/amd64", "linux/arm64/v8"],
            "freshnessInterval": 900,
            "extraArgs": ["--registry-pace=1"],
        },
        "proxy": {"port": 5005},
        "log": {"level": "debug", "format": "plain"},
    }
    docs = helm.template(values)
    operator = one(docs, "Deployment")
    assert operator["spec"]["replicas"] == 1
    assert not of_kind(docs, "PodDisruptionBudget")  # one replica cannot keep one available
    args = container(operator, "operator")["args"]
    for arg in (
        "--proxy-address=localhost:5005",
        "--expiry=12h",
        r"--include=^docker\.io/",
        "--include=^ghcr.io/org/",
        r"--exclude=^registry\.internal/",
        "--platform=linux/amd64",
        "--platform=linux/arm64/v8",
        "--freshness-interval=900",
        "--log-level=debug",
        "--log-format=plain",
        "--registry-pace=1",
    ):
        assert arg in args


def test_proxy_daemonset(helm: Helm) -> None:
    docs = helm.template()
    proxy = one(docs, "DaemonSet", "stowage-proxy")
    assert proxy["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    spec = pod_spec(proxy)
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]  # every taint
    assert spec["automountServiceAccountToken"] is False
    assert "hostNetwork" not in spec
    c = container(proxy, "proxy")
    (port,) = c["ports"]
    assert port == {
        "name": "http",
        "containerPort": 7439,
        "hostIP": "127.0.0.1",
        "hostPort": 7439,
        "protocol": "TCP",
    }
    assert c["args"][:4] == [
        "serve",
        "--listen=0.0.0.0:7439",
        f"--parent={CACHE_URL}",
        "--data=/var/lib/stowage",
    ]
    assert "--max-size=10G" in c["args"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert {"name": "data", "mountPath": "/var/lib/stowage"} in c["volumeMounts"]
    assert "initContainers" not in spec
    # --parent is the cluster cache's Service.
    service = one(docs, "Service", "stowage-cache")
    meta, (port,) = service["metadata"], service["spec"]["ports"]
    assert f"http://{meta['name']}.{meta['namespace']}.svc:{port['port']}" == CACHE_URL


def test_proxy_host_path(helm: Helm) -> None:
    proxy = one(helm.template(HOST_PATH), "DaemonSet", "stowage-proxy")
    spec = pod_spec(proxy)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["hostPath"] == {"path": "/var/lib/stowage", "type": "DirectoryOrCreate"}
    (init,) = spec["initContainers"]
    assert init["command"] == ["chown", "65532:65532", "/var/lib/stowage"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False

    values = merged(HOST_PATH, {"proxy": {"data": {"hostPath": {"initChown": False}}}})
    assert "initContainers" not in pod_spec(
        one(helm.template(values), "DaemonSet", "stowage-proxy")
    )

    values = {"proxy": {"data": {"emptyDir": {"sizeLimit": "12Gi"}}}}
    proxy = one(helm.template(values), "DaemonSet", "stowage-proxy")
    volumes = {v["name"]: v for v in pod_spec(proxy)["volumes"]}
    assert volumes["data"]["emptyDir"] == {"sizeLimit": "12Gi"}


def test_cache_statefulset(helm: Helm) -> None:
    docs = helm.template()
    cache = one(docs, "StatefulSet", "stowage-cache")
    assert cache["spec"]["replicas"] == 1
    assert cache["spec"]["serviceName"] == "stowage-cache"
    (claim,) = cache["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    spec = pod_spec(cache)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["fsGroup"] == 65532  # the volume is writable
    c = container(cache, "cache")
    assert c["args"] == [
        "serve",
        "--listen=0.0.0.0:7439",
        "--data=/var/lib/stowage",
        "--max-size=85%",
        "--admin-token-file=/etc/stowage/admin/token",
        "--log-level=info",
        "--log-format=json",
    ]
    assert {"name": "data", "mountPath": "/var/lib/stowage"} in c["volumeMounts"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = one(docs, "Service", "stowage-cache")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 7439, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"].items() <= (
        cache["spec"]["template"]["metadata"]["labels"].items()
    )


def test_cache_options(helm: Helm) -> None:
    docs = helm.template(OPTIONS)
    cache = one(docs, "StatefulSet")
    c = container(cache, "cache")
    for arg in (
        "--insecure-registry=registry.local:5000",
        "--auth-file=/etc/stowage/auth/config.json",
        "--tag-ttl=600",
    ):
        assert arg in c["args"]
    assert {"name": "auth", "mountPath": "/etc/stowage/auth", "readOnly": True} in c["volumeMounts"]
    volume = {v["name"]: v for v in pod_spec(cache)["volumes"]}["auth"]
    assert volume["secret"] == {
        "secretName": "regcred",
        "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
    }
    (claim,) = cache["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast"
    # The node proxies reach the same insecure registries when the cache fails.
    assert (
        "--insecure-registry=registry.local:5000"
        in container(one(docs, "DaemonSet", "stowage-proxy"), "proxy")["args"]
    )

    values = {"cache": {"storage": {"storageClassName": "-", "size": "200Gi"}}}
    (claim,) = one(helm.template(values), "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == ""
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"


def test_service_monitor(helm: Helm) -> None:
    assert not of_kind(helm.template(), "ServiceMonitor")
    docs = helm.template(merged(SERVICE_MONITOR, {"serviceMonitor": {"labels": {"r": "p"}}}))
    monitor = one(docs, "ServiceMonitor", RELEASE)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["r"] == "p"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    # It selects the cluster cache's Service and the proxies' and operators' headless ones.
    selector = monitor["spec"]["selector"]

    def selected(service: Doc) -> bool:
        labels = service["metadata"]["labels"]
        if not selector["matchLabels"].items() <= labels.items():
            return False
        return all(
            labels.get(e["key"]) in e["values"]
            for e in selector["matchExpressions"]
            if e["operator"] == "In"
        )

    assert sorted(s["metadata"]["name"] for s in of_kind(docs, "Service") if selected(s)) == [
        "stowage-cache",
        "stowage-operator-metrics",
        "stowage-proxy",
    ]
    operator = one(docs, "Service", "stowage-operator-metrics")
    assert operator["spec"]["ports"][0]["targetPort"] == "metrics"
    proxies = one(docs, "Service", "stowage-proxy")
    assert proxies["spec"]["clusterIP"] == "None"
    assert proxies["spec"]["ports"][0]["targetPort"] == "http"


# --- the node agent -------------------------------------------------------------------------


def agent_rules(docs: list[Doc]) -> list[Doc]:
    rules: list[Doc] = one(docs, "ClusterRole", "stowage-agent")["rules"]
    return rules


AGENT_BASE_RULES = [
    {"apiGroups": ["stowage.dev"], "resources": ["imagecaches"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["stowage.dev"], "resources": ["imagecaches/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
]
NODES_PATCH_RULE = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}
SECRETS_GET_RULE = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
STARTUP_TOLERATION = {"key": "stowage.dev/not-ready", "operator": "Exists", "effect": "NoSchedule"}


def test_agent_daemonset(helm: Helm) -> None:
    docs = helm.template()
    agent = one(docs, "DaemonSet", "stowage-agent")
    assert agent["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert agent["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "agent"
    spec = pod_spec(agent)
    assert spec["serviceAccountName"] == "stowage-agent"
    # The node proxy listens on the node's 127.0.0.1 only: the agent shares the node's network.
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]  # every taint
    assert "nodeSelector" not in spec and "affinity" not in spec
    assert "initContainers" not in spec
    c = container(agent, "agent")
    assert c["args"] == [
        "agent",
        "--cri-socket=unix:///run/containerd/containerd.sock",
        "--containerd-config-path=/etc/containerd/certs.d",
        "--state-dir=/var/lib/stowage-agent",
        "--proxy-url=http://127.0.0.1:7439",
        "--proxy-address=localhost:7439",
        "--health-listen=127.0.0.1:8081",
        "--disk-threshold=85",
        "--sync-interval=30s",
        "--log-level=info",
        "--log-format=json",
    ]
    # Mirror mode is off and the start-up taint is left alone by default.
    assert not [a for a in c["args"] if a.startswith(("--mirror", "--remove-taint"))]
    assert c["env"] == [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    ]
    assert "ports" not in c  # nothing published: the health endpoint is on the node's loopback
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": 8081}
    assert "readinessProbe" not in c
    # Root for file access only: no capability, no escalation, nothing writable but mounts.
    assert c["securityContext"] == {
        "runAsNonRoot": False,
        "runAsUser": 0,
        "runAsGroup": 0,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert spec["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["volumeMounts"] == [
        {
            "name": "cri-socket",
            "mountPath": "/run/containerd",
            "readOnly": True,
            "mountPropagation": "HostToContainer",
        },
        {"name": "containerd-config", "mountPath": "/etc/containerd/certs.d"},
        {
            "name": "containerd-root",
            "mountPath": "/var/lib/containerd",
            "readOnly": True,
            "mountPropagation": "HostToContainer",
        },
        {"name": "state", "mountPath": "/var/lib/stowage-agent"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    assert spec["volumes"] == [
        {"name": "cri-socket", "hostPath": {"path": "/run/containerd", "type": "Directory"}},
        {
            "name": "containerd-config",
            "hostPath": {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"},
        },
        {
            "name": "containerd-root",
            "hostPath": {"path": "/var/lib/containerd", "type": "Directory"},
        },
        {
            "name": "state",
            "hostPath": {"path": "/var/lib/stowage-agent", "type": "DirectoryOrCreate"},
        },
        {"name": "tmp", "emptyDir": {}},
    ]
    # Its ServiceAccount carries a token (it uses the API); its role has no secrets and no
    # node writes.
    account = one(docs, "ServiceAccount", "stowage-agent")
    assert "automountServiceAccountToken" not in account
    assert agent_rules(docs) == AGENT_BASE_RULES
    binding = one(docs, "ClusterRoleBinding", "stowage-agent")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "stowage-agent",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "stowage-agent", "namespace": NAMESPACE}
    ]
    # Nothing changes for the others: no plain-HTTP registry, no extra toleration.
    assert not [
        a
        for w in (one(docs, "DaemonSet", "stowage-proxy"), one(docs, "StatefulSet"))
        for a in containers(w)[-1]["args"]
        if a.startswith("--insecure-registry")
    ]
    assert pod_spec(one(docs, "DaemonSet", "stowage-proxy"))["tolerations"] == [
        {"operator": "Exists"}
    ]


def test_agent_mirror_taint_and_pull_secrets(helm: Helm) -> None:
    docs = helm.template(AGENT_OPTIONS)
    args = container(one(docs, "DaemonSet", "stowage-agent"), "agent")["args"]
    assert [a for a in args if a.startswith(("--mirror", "--remove-taint"))] == [
        "--mirror=docker.io",
        "--mirror=http://registry.local:5000",
        "--remove-taint",
    ]
    assert agent_rules(docs) == [*AGENT_BASE_RULES, NODES_PATCH_RULE, SECRETS_GET_RULE]
    # The plain-HTTP mirrored registry is one the node proxies and the cluster cache reach
    # over plain HTTP too.
    for workload, name in (
        (one(docs, "DaemonSet", "stowage-proxy"), "proxy"),
        (one(docs, "StatefulSet"), "cache"),
    ):
        insecure = [a for a in container(workload, name)["args"] if a.startswith("--insecure")]
        assert insecure == ["--insecure-registry=registry.local:5000"], name
    # Listed in cache.insecureRegistries as well: passed once.
    values = merged(AGENT_OPTIONS, {"cache": {"insecureRegistries": ["registry.local:5000"]}})
    args = container(one(helm.template(values), "StatefulSet"), "cache")["args"]
    assert [a for a in args if a.startswith("--insecure")] == [
        "--insecure-registry=registry.local:5000"
    ]
    # Each option alone grants only its own rule.
    only_taint = {"agent": {"startupTaint": True}}
    assert agent_rules(helm.template(only_taint)) == [*AGENT_BASE_RULES, NODES_PATCH_RULE]
    only_secrets = {"agent": {"readPullSecrets": True}}
    assert agent_rules(helm.template(only_secrets)) == [*AGENT_BASE_RULES, SECRETS_GET_RULE]
    # Without the agent, its mirrors mean nothing.
    values = merged(AGENT_OPTIONS, {"agent": {"enabled": False}})
    args = container(one(helm.template(values), "StatefulSet"), "cache")["args"]
    assert not [a for a in args if a.startswith("--insecure")]


def test_agent_values_become_args(helm: Helm) -> None:
    values = {
        "agent": {
            "criSocket": "unix:///run/k3s/containerd/containerd.sock",
            "containerdConfigPath": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
            "containerdRoot": "",
            "diskThreshold": 92.5,
            "syncInterval": 60,
            "healthPort": 9102,
            "extraArgs": ["--kubeconfig=/etc/agent/kubeconfig"],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "affinity": {"nodeAffinity": {"x": 1}},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "podAnnotations": {"a": "b"},
            "priorityClassName": "",
            "startupTaint": True,
        },
        "proxy": {"port": 5005, "tolerations": []},
        "log": {"level": "debug", "format": "plain"},
    }
    docs = helm.template(values)
    agent = one(docs, "DaemonSet", "stowage-agent")
    spec = pod_spec(agent)
    c = container(agent, "agent")
    assert c["args"] == [
        "agent",
        "--cri-socket=unix:///run/k3s/containerd/containerd.sock",
        "--containerd-config-path=/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
        "--state-dir=/var/lib/stowage-agent",
        "--proxy-url=http://127.0.0.1:5005",
        "--proxy-address=localhost:5005",
        "--health-listen=127.0.0.1:9102",
        "--disk-threshold=92.5",
        "--sync-interval=60",
        "--remove-taint",
        "--log-level=debug",
        "--log-format=plain",
        "--kubeconfig=/etc/agent/kubeconfig",
    ]
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == 9102
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {
        "cri-socket": "/run/k3s/containerd",
        "containerd-config": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
        "state": "/var/lib/stowage-agent",
        "tmp": "/tmp",
    }
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    assert volumes["cri-socket"] == "/run/k3s/containerd"
    assert "containerd-root" not in volumes
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["affinity"] == {"nodeAffinity": {"x": 1}}
    assert agent["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    assert "priorityClassName" not in spec
    # Narrower tolerations: the start-up taint is added, for the agent and the node proxy,
    # which must both run before the taint comes off.
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}, STARTUP_TOLERATION]
    assert pod_spec(one(docs, "DaemonSet", "stowage-proxy"))["tolerations"] == [STARTUP_TOLERATION]
    # Without agent.startupTaint, tolerations are as given.
    values["agent"]["startupTaint"] = False
    docs = helm.template(values)
    assert pod_spec(one(docs, "DaemonSet", "stowage-agent"))["tolerations"] == [
        {"key": "gpu", "operator": "Exists"}
    ]
    assert "tolerations" not in pod_spec(one(docs, "DaemonSet", "stowage-proxy"))


def test_agent_accepts_the_rendered_args(helm: Helm, tmp_path: Path) -> None:
    """Every flag the chart passes exists and its value is valid for `stowage agent`: the
    rendered command runs with --uninstall (the documented uninstall step), which parses
    and validates all options, then restores an empty directory and exits."""
    values = merged(AGENT_OPTIONS, {"agent": {"diskThreshold": 92.5, "syncInterval": "5m"}})
    args = container(one(helm.template(values), "DaemonSet", "stowage-agent"), "agent")["args"]
    assert args[0] == "agent"
    hosts = tmp_path / "certs.d"
    hosts.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOWAGE_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stowage",
            *args,
            f"--containerd-config-path={hosts}",
            "--uninstall",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "NODE_NAME": "node-1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "restored 0, removed 0" in proc.stdout
    # The mirrored registries are ones the agent accepts (checked when it starts).
    for arg in args:
        if arg.startswith("--mirror="):
            MirroredRegistry.parse(arg.removeprefix("--mirror="))


# --- security -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values", [None, merged(CERT_MANAGER, SERVICE_MONITOR)], ids=["defaults", "cert-manager"]
)
def test_rbac_least_privilege(helm: Helm, values: dict[str, Any] | None) -> None:
    docs = helm.template(values)
    for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
    cluster_role = one(docs, "ClusterRole", "stowage-operator")
    assert not [r for r in cluster_role["rules"] if "secrets" in r["resources"]]
    granted = {
        (group, resource, verb)
        for r in cluster_role["rules"]
        for group in r["apiGroups"]
        for resource in r["resources"]
        for verb in r["verbs"]
    }
    for needed in [
        ("", "pods", "watch"),
        ("stowage.dev", "cachedimages", "create"),
        ("stowage.dev", "cachedimages", "delete"),
        ("stowage.dev", "cachedimages/status", "patch"),
        ("stowage.dev", "cachedimages/finalizers", "update"),
        ("kopf.dev", "clusterkopfpeerings", "watch"),
        ("kopf.dev", "clusterkopfpeerings", "patch"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ]:
        assert needed in granted
    # Nothing the operator does not use: kopf posts no Events (posting is off) and, running
    # cluster-wide, scans no namespaces; CachedImages are patched, never updated.
    assert not {(g, r, v) for g, r, v in granted if r in ("events", "namespaces")}
    assert ("stowage.dev", "cachedimages", "update") not in granted
    assert not {
        (g, r, v) for g, r, v in granted if r == "pods" and v not in ("get", "list", "watch")
    }
    # Writes to other objects than the chart's own are limited by name.
    for rule in cluster_role["rules"]:
        named = rule["resources"] in (["clusterkopfpeerings"], ["mutatingwebhookconfigurations"])
        if named and set(rule["verbs"]) - {"get", "list", "watch"}:
            assert rule["resourceNames"] == [RELEASE]
    bindings = of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["name"] for b in bindings) == sorted(
        ["stowage-operator", "stowage-agent"] + (["stowage-operator"] if values is None else [])
    )
    for binding in bindings:
        # Each role is bound to its own component's ServiceAccount only.
        name = binding["metadata"]["name"]
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}
        ]
    if values is None:
        role = one(docs, "Role", "stowage-operator")
        assert role["metadata"]["namespace"] == NAMESPACE
        assert role["rules"] == [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": ["stowage-webhook-tls"],
                "verbs": ["get", "update"],
            },
            # create cannot be limited by name (a create request carries none in its URL).
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        ]
        hooks = [
            r for r in cluster_role["rules"] if "mutatingwebhookconfigurations" in r["resources"]
        ]
        assert hooks == [
            {
                "apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["mutatingwebhookconfigurations"],
                "resourceNames": [RELEASE],
                "verbs": ["get", "patch"],
            }
        ]
    # Only the operator and the agent talk to the API server.
    registry = one(docs, "ServiceAccount", "stowage-registry")
    assert registry["automountServiceAccountToken"] is False
    for workload in workloads(docs):
        spec = pod_spec(workload)
        if workload["kind"] == "Deployment":
            assert spec["serviceAccountName"] == "stowage-operator"
        elif workload["metadata"]["name"] == "stowage-agent":
            assert spec["serviceAccountName"] == "stowage-agent"
            assert "automountServiceAccountToken" not in spec
        else:
            assert spec["serviceAccountName"] == "stowage-registry"
            assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("values", [None, AGENT_OPTIONS], ids=["defaults", "agent-options"])
def test_agent_rbac_least_privilege(helm: Helm, values: dict[str, Any] | None) -> None:
    rules = agent_rules(helm.template(values))
    granted = {
        (group, resource, verb)
        for r in rules
        for group in r["apiGroups"]
        for resource in r["resources"]
        for verb in r["verbs"]
    }
    for r in rules:
        assert "resourceNames" not in r
    # Read-only everywhere, except the status subresource of ImageCaches and, with
    # agent.startupTaint, nodes.
    writes = {(g, r, v) for g, r, v in granted if v not in ("get", "list", "watch")}
    assert writes == {("stowage.dev", "imagecaches/status", "patch")} | (
        {("", "nodes", "patch")} if values else set()
    )
    # Secrets: get one by name only (never list or watch), and only with readPullSecrets.
    assert {(g, r, v) for g, r, v in granted if r == "secrets"} == (
        {("", "secrets", "get")} if values else set()
    )
    assert {r for _, r, _ in granted} <= {"imagecaches", "imagecaches/status", "nodes", "secrets"}


@pytest.mark.parametrize("values", [None, OPTIONS], ids=["defaults", "with-options"])
def test_every_container_runs_as_non_root(helm: Helm, values: dict[str, Any] | None) -> None:
    docs = helm.template(values)
    assert len(workloads(docs)) == 4
    for workload in workloads(docs):
        spec = pod_spec(workload)
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "hostPID" not in spec and "hostIPC" not in spec
        # The node agent is the one exception, by necessity: it talks to the container
        # runtime's root-owned CRI socket and writes root-owned files under containerd's
        # config_path, and reaches the node proxy on the node's loopback (host network).
        # It is root without any capability; test_agent_daemonset checks its context.
        agent = workload["metadata"]["name"] == "stowage-agent"
        assert ("hostNetwork" in spec) == agent
        for c in containers(workload):
            where = f"{workload['kind']}/{c['name']}"
            assert runs_as_non_root(workload, c) != agent, where
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert "privileged" not in ctx, where
            # A writable /tmp, since the root filesystem is read-only.
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], where


def test_only_the_agent_and_the_host_path_chown_run_as_root(helm: Helm) -> None:
    docs = helm.template(HOST_PATH)
    root = [
        (w["metadata"]["name"], c["name"])
        for w in workloads(docs)
        for c in containers(w)
        if not runs_as_non_root(w, c)
    ]
    assert sorted(root) == [("stowage-agent", "agent"), ("stowage-proxy", "chown-data")]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"webhook": {"timeoutSeconds": 30}}, "timeoutSeconds must be between 1 and 10"),
        ({"webhook": {"timeoutSeconds": 0}}, "timeoutSeconds must be between 1 and 10"),
        ({"proxy": {"data": {"type": "pvc"}}}, "proxy.data.type must be emptyDir or hostPath"),
        ({"agent": {"diskThreshold": 0}}, "agent.diskThreshold must be more than 0 and at most"),
        ({"agent": {"diskThreshold": 101}}, "agent.diskThreshold must be more than 0 and at most"),
        ({"agent": {"criSocket": "containerd.sock"}}, "agent.criSocket must be an absolute path"),
        (
            {"agent": {"containerdConfigPath": "certs.d"}},
            "agent.containerdConfigPath must be an absolute path",
        ),
        ({"agent": {"containerdRoot": "containerd"}}, "agent.containerdRoot must be an absolute"),
    ],
    ids=[
        "timeout-too-long",
        "timeout-zero",
        "proxy-data-type",
        "agent-disk-threshold-zero",
        "agent-disk-threshold-over-100",
        "agent-cri-socket",
        "agent-config-path",
        "agent-containerd-root",
    ],
)
def test_invalid_values_are_refused(helm: Helm, values: dict[str, Any], message: str) -> None:
    proc = helm.run("template", RELEASE, str(CHART), values=values, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


# --- documentation --------------------------------------------------------------------------


def _values_lines() -> dict[str, int]:
    """Dotted path of every key in values.yaml → its line number."""
    paths: dict[str, int] = {}
    stack: list[str] = []
    for n, line in enumerate((CHART / "values.yaml").read_text().splitlines()):
        m = re.match(r"^( *)([A-Za-z][\w]*):", line)
        if not m:
            continue
        depth = len(m[1]) // 2
        stack = [*stack[:depth], m[2]]
        paths[".".join(stack)] = n
    return paths


def _leaves(values: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(values, dict) and values:
        for key, value in values.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_every_value_is_documented() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    table = DOCS.read_text().split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([\w.]+)` \|", table, re.M))
    assert len(documented) > 50
    lines = _values_lines()
    text = (CHART / "values.yaml").read_text().splitlines()
    for path in documented:
        assert path in lines, f"docs/helm.md documents {path}, which values.yaml lacks"
        assert text[lines[path] - 1].lstrip().startswith("#"), f"no comment above {path}"
    for leaf in _leaves(values):
        parts = leaf.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        assert prefixes & documented, f"{leaf} is not in the values table of docs/helm.md"


# --- a real API server ------------------------------------------------------------------------


def _crd(group: str, kind: str, plural: str) -> Doc:
    """A stand-in CRD that accepts any object of the kind."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


STAND_IN_CRDS = [
    _crd("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
    _crd("cert-manager.io", "Issuer", "issuers"),
    _crd("cert-manager.io", "Certificate", "certificates"),
]


def _install_crds(kube: KubeAPI, crds: list[Doc]) -> list[str]:
    """Server-side apply ``crds`` for real, wait until Established; returns the names of
    those that did not exist before (to delete afterwards)."""
    names = [c["metadata"]["name"] for c in crds]
    new = [
        name
        for name in names
        if kube.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")[0]
        == 404
    ]
    kube.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=stowage-chart-test",
        "-f",
        "-",
        input=yaml.safe_dump_all(crds),
    )
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names)
    )
    return new


def _remove_crds(kube: KubeAPI, names: list[str]) -> None:
    if names:
        kube.kubectl("delete", "--wait=true", "--timeout=60s", *(f"crd/{n}" for n in names))


@pytest.fixture(scope="module")
def chart_crds(kube: KubeAPI, helm: Helm) -> Iterator[list[str]]:
    """The chart's CRDs, from ``helm template --include-crds``, applied for real."""
    crds = of_kind(helm.template(include_crds=True), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == sorted(STOWAGE_CRDS)
    created = _install_crds(kube, crds)
    yield [c["metadata"]["name"] for c in crds]
    _remove_crds(kube, created)


@pytest.fixture
def stand_in_crds(kube: KubeAPI) -> Iterator[None]:
    created = _install_crds(kube, STAND_IN_CRDS)
    yield
    _remove_crds(kube, created)


def _dry_run(kube: KubeAPI, docs: list[Doc]) -> subprocess.CompletedProcess[str]:
    proc = kube.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=stowage-chart-test",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _accepted(kube: KubeAPI, docs: list[Doc]) -> None:
    proc = _dry_run(kube, docs)
    applied = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(docs), proc.stdout


@pytest.mark.usefixtures("chart_crds")
def test_apiserver_accepts_default_render(kube: KubeAPI, namespace: str, helm: Helm) -> None:
    docs = helm.template(namespace=namespace)
    assert not of_kind(docs, "CustomResourceDefinition")
    _accepted(kube, docs)
    # A dry run: nothing was created.
    out = kube.kubectl("get", "deploy,ds,sts,svc", "-n", namespace, "-o", "name").stdout
    assert out.strip() == ""
    # The proxies' priority class is one the API server itself provides.
    kube.kubectl("get", "priorityclass", "system-node-critical")


@pytest.mark.usefixtures("chart_crds", "stand_in_crds")
def test_apiserver_accepts_render_with_options(kube: KubeAPI, namespace: str, helm: Helm) -> None:
    docs = helm.template(merged(OPTIONS, HOST_PATH), namespace=namespace)
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "Issuer", "Certificate"} <= kinds
    # The agent with mirror mode, the start-up taint and pull secrets.
    assert "--remove-taint" in container(one(docs, "DaemonSet", "stowage-agent"), "agent")["args"]
    assert SECRETS_GET_RULE in agent_rules(docs)
    _accepted(kube, docs)
    # And a render with the agent's other knobs (no containerd root, narrower tolerations).
    values = {
        "agent": {
            "containerdRoot": "",
            "criSocket": "unix:///run/k3s/containerd/containerd.sock",
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "startupTaint": True,
            "extraArgs": ["--sync-interval=10s"],
        }
    }
    _accepted(kube, helm.template(values, namespace=namespace))


def _pod_security_violations(kube: KubeAPI, workload: Doc) -> list[str]:
    """The names of the Pod Security checks ``workload`` fails at the namespace's warn
    level, e.g. ["hostPort"]."""
    warnings = [
        line for line in _dry_run(kube, [workload]).stderr.splitlines() if "PodSecurity" in line
    ]
    if not warnings:
        return []
    (warning,) = warnings
    # '...: check (details), check (details (nested)), ...': drop the details, innermost first.
    listed = warning.split('": ', 1)[1]
    while (shorter := re.sub(r"\([^()]*\)", "", listed)) != listed:
        listed = shorter
    return [name.strip() for name in listed.split(",")]


@pytest.mark.usefixtures("chart_crds")
def test_pod_security_levels(kube: KubeAPI, namespace: str, helm: Helm) -> None:
    """The operator and the cluster cache meet Pod Security "restricted"; the node proxy
    only breaks it with its hostPort. The node agent needs the "privileged" level: it breaks
    "baseline" with the host network, hostPath volumes and its probes' host (127.0.0.1, on
    the host network), and "restricted" with running as root as well — and nothing else (no
    privileged container, no capability, no privilege escalation)."""
    docs = helm.template(namespace=namespace)
    expected = {
        "baseline": {
            "stowage-proxy": ["hostPort"],
            "stowage-agent": ["host namespaces", "hostPath volumes", "probe or lifecycle host"],
        },
        "restricted": {
            "stowage-proxy": ["hostPort"],
            "stowage-agent": [
                "host namespaces",
                "probe or lifecycle host",
                "restricted volume types",
                "runAsNonRoot != true",
                "runAsUser=0",
            ],
        },
    }
    for level, violations in expected.items():
        kube.kubectl(
            "label",
            "--overwrite",
            "namespace",
            namespace,
            f"pod-security.kubernetes.io/warn={level}",
        )
        for workload in workloads(docs):
            name = workload["metadata"]["name"]
            found = _pod_security_violations(kube, workload)
            assert sorted(found) == sorted(violations.get(name, [])), (level, name)


RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@contextlib.contextmanager
def _rbac_applied(kube: KubeAPI, docs: list[Doc]) -> Iterator[None]:
    """The ServiceAccounts, roles and bindings of ``docs`` created for real; the
    cluster-scoped ones are deleted afterwards (the namespaced ones go with the namespace)."""
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    kube.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(rbac))
    try:
        yield
    finally:
        cluster_scoped = [
            f"{d['kind'].lower()}/{d['metadata']['name']}"
            for d in rbac
            if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
        ]
        kube.kubectl("delete", "--ignore-not-found", *cluster_scoped)


def _can_i_mismatches(
    kube: KubeAPI, user: str, cases: list[tuple[list[str], bool]]
) -> list[tuple[list[str], str, str]]:
    """The ``kubectl auth can-i`` cases whose answer for ``user`` is not the expected one."""
    wrong = []
    for args, expected in cases:
        proc = kube.kubectl("auth", "can-i", *args, f"--as={user}", check=False)
        if (proc.stdout.strip() == "yes") != expected:
            wrong.append((args, proc.stdout.strip(), proc.stderr.strip()))
    return wrong


@pytest.mark.usefixtures("chart_crds")
def test_operator_rbac_on_the_apiserver(kube: KubeAPI, namespace: str, helm: Helm) -> None:
    """The operator's RBAC, created for real, grants what it needs and no more."""
    release = f"r{namespace}"  # its own cluster-scoped names
    fullname = f"{release}-stowage"
    docs = helm.template(namespace=namespace, release=release)
    with _rbac_applied(kube, docs):
        cases = [
            (["list", "pods", "-A"], True),
            (["watch", "pods", "-A"], True),
            (["delete", "pods", "-n", "default"], False),
            (["create", "pods", "-n", "default"], False),
            (["create", "cachedimages.stowage.dev"], True),
            (["delete", "cachedimages.stowage.dev"], True),
            (["patch", "cachedimages.stowage.dev", "--subresource=status"], True),
            (["list", "clusterkopfpeerings.kopf.dev"], True),
            (["patch", f"clusterkopfpeerings.kopf.dev/{fullname}"], True),
            (["patch", "clusterkopfpeerings.kopf.dev/other"], False),
            (["create", "events", "-n", "default"], False),
            (["create", "events.events.k8s.io", "-n", "default"], False),
            (["watch", "namespaces"], False),
            (["delete", "namespaces"], False),
            (["watch", "customresourcedefinitions.apiextensions.k8s.io"], True),
            (["patch", f"mutatingwebhookconfigurations/{fullname}"], True),
            (["patch", "mutatingwebhookconfigurations/other"], False),
            (["create", "mutatingwebhookconfigurations"], False),
            (["get", f"secrets/{fullname}-webhook-tls", "-n", namespace], True),
            (["update", f"secrets/{fullname}-webhook-tls", "-n", namespace], True),
            (["get", "secrets/other", "-n", namespace], False),
            (["list", "secrets", "-n", namespace], False),
            (["create", "secrets", "-n", namespace], True),
            (["create", "secrets", "-n", "default"], False),
            (["get", "secrets", "-A"], False),
            (["get", "configmaps", "-n", namespace], False),
        ]
        operator = f"system:serviceaccount:{namespace}:{fullname}-operator"
        registry = f"system:serviceaccount:{namespace}:{fullname}-registry"
        wrong = _can_i_mismatches(kube, operator, cases)
        # The proxies and the cache have nothing at all.
        wrong += _can_i_mismatches(kube, registry, [(a, False) for a, yes in cases if yes])
        assert wrong == []


@pytest.mark.usefixtures("chart_crds")
@pytest.mark.parametrize("values", [None, AGENT_OPTIONS], ids=["defaults", "agent-options"])
def test_agent_rbac_on_the_apiserver(
    kube: KubeAPI, namespace: str, helm: Helm, values: dict[str, Any] | None
) -> None:
    """The agent's RBAC, created for real: ImageCaches and its node, no more; nodes patch
    only with agent.startupTaint, Secrets get only with agent.readPullSecrets."""
    release = f"r{namespace}"  # its own cluster-scoped names
    fullname = f"{release}-stowage"
    taint = secrets = values is not None
    docs = helm.template(values, namespace=namespace, release=release)
    with _rbac_applied(kube, docs):
        cases = [
            (["get", "imagecaches.stowage.dev", "-n", "default"], True),
            (["list", "imagecaches.stowage.dev", "-A"], True),
            (["watch", "imagecaches.stowage.dev", "-A"], True),
            (["patch", "imagecaches.stowage.dev", "--subresource=status", "-n", "default"], True),
            (["update", "imagecaches.stowage.dev", "--subresource=status"], False),
            (["patch", "imagecaches.stowage.dev", "-n", "default"], False),
            (["create", "imagecaches.stowage.dev", "-n", "default"], False),
            (["delete", "imagecaches.stowage.dev", "-n", "default"], False),
            (["get", "nodes/node-1"], True),
            (["list", "nodes"], True),
            (["watch", "nodes"], True),
            (["patch", "nodes/node-1"], taint),
            (["update", "nodes/node-1"], False),
            (["delete", "nodes/node-1"], False),
            (["patch", "nodes/node-1", "--subresource=status"], False),
            (["get", "secrets/regcred", "-n", "default"], secrets),
            (["get", "secrets/regcred", "-n", namespace], secrets),
            (["list", "secrets", "-A"], False),
            (["watch", "secrets", "-A"], False),
            (["create", "secrets", "-n", namespace], False),
            (["create", "pods", "-n", "default"], False),
            (["create", "pods", "-n", namespace], False),
            (["get", "pods", "-n", "default"], False),
            (["create", "pods/exec", "-n", namespace], False),
            (["get", "cachedimages.stowage.dev"], False),
            (["list", "cachedimages.stowage.dev"], False),
            (["patch", "cachedimages.stowage.dev"], False),
            (["patch", "cachedimages.stowage.dev", "--subresource=status"], False),
            (["create", "events", "-n", namespace], False),
            (["get", "configmaps", "-n", namespace], False),
        ]
        agent = f"system:serviceaccount:{namespace}:{fullname}-agent"
        assert _can_i_mismatches(kube, agent, cases) == []
        # The write the agent makes, with a token of its ServiceAccount: a merge patch of its
        # node's entry in an ImageCache's status (a bare PATCH of the status subresource).
        cache = {
            "apiVersion": "stowage.dev/v1alpha1",
            "kind": "ImageCache",
            "metadata": {"name": "base", "namespace": namespace},
            "spec": {"images": ["docker.io/library/nginx:1.27"]},
        }
        kube.kubectl("create", "-f", "-", input=json.dumps(cache))
        token = kube.kubectl("create", "token", f"{fullname}-agent", "-n", namespace).stdout
        path = f"/apis/stowage.dev/v1alpha1/namespaces/{namespace}/imagecaches/base"
        entry = {"image": "docker.io/library/nginx:1.27", "state": "Pulled"}
        status = {"images": 1, "nodes": {"node-1": {"images": [entry]}}}
        merge = {"content_type": "application/merge-patch+json", "token": token.strip()}
        code, _ = kube.request("PATCH", f"{path}/status", {"status": status}, **merge)
        assert code == 200
        assert kube.ok("GET", path)["status"]["nodes"]["node-1"]["images"] == [entry]
        # Its spec stays out of reach.
        code, _ = kube.request("PATCH", path, {"spec": {"images": []}}, **merge)
        assert code == 403
        # The operator gets none of the agent's permissions on nodes.
        operator = f"system:serviceaccount:{namespace}:{fullname}-operator"
        node_cases = [(["get", "nodes/node-1"], False), (["patch", "nodes/node-1"], False)]
        assert _can_i_mismatches(kube, operator, node_cases) == []


def test_cachedimage_crd(kube: KubeAPI, chart_crds: list[str]) -> None:
    assert "cachedimages.stowage.dev" in chart_crds
    proc = kube.kubectl("get", "cachedimages")
    assert proc.returncode == 0
    name = "docker.io-library-nginx-1.27-chart-test"
    example = {
        "apiVersion": "stowage.dev/v1alpha1",
        "kind": "CachedImage",
        "metadata": {"name": name},
        "spec": {
            "sourceImage": "docker.io/library/nginx:1.27",
            "expiresAt": "2030-01-02T03:04:05Z",
        },
    }
    kube.kubectl("create", "-f", "-", input=json.dumps(example))
    try:
        status = {"phase": "Cached", "size": 12345, "usedBy": {"count": 2, "pods": ["a/b"]}}
        kube.kubectl(
            "patch",
            "ci",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
        got = json.loads(kube.kubectl("get", "ci", name, "-o", "json").stdout)
        assert got["spec"]["retain"] is False  # defaulted by the schema
        assert got["status"]["phase"] == "Cached"
        header, row = kube.kubectl("get", "ci", name).stdout.splitlines()
        assert header.split() == ["NAME", "IMAGE", "PHASE", "SIZE", "PODS", "EXPIRES", "AGE"]
        assert row.split()[:5] == [name, "docker.io/library/nginx:1.27", "Cached", "12345", "2"]
        # The schema is enforced.
        bad_phase = {"status": {"phase": "Bogus"}}
        proc = kube.kubectl(
            "patch",
            "ci",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(bad_phase),
            check=False,
        )
        assert proc.returncode != 0 and "Unsupported value" in proc.stderr
        no_image = {**example, "metadata": {"name": "no-image"}, "spec": {"retain": True}}
        proc = kube.kubectl("create", "-f", "-", input=json.dumps(no_image), check=False)
        assert proc.returncode != 0 and "sourceImage" in proc.stderr
    finally:
        kube.kubectl("delete", "ci", name, "--ignore-not-found")
