"""The operator against a real kube-apiserver: the chart's CRDs and webhook configuration
(rendered by helm), `stowage operator` as a process serving the webhook over TLS, a real
`stowage serve` as the cluster cache and the Debian registry as upstream."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import SampleImages
from tests.support.images import push_image
from tests.support.kube import KubeAPI
from tests.support.operators import (
    CI_PATH,
    Operator,
    cached_images,
    create_cached_image,
    install_cluster_objects,
    wait_cached_image,
)
from tests.support.registry import Registry
from tests.support.stowage import Stowage, run_cli
from tests.support.util import wait_until

pytestmark = pytest.mark.integration

PROXY = "localhost:7439"
RELEASE = "stowage"
OPERATOR_NS = "stowage-system"
EXPIRY = 4  # seconds: pods deleted → CachedImage gone this long after
ORIGINAL = "stowage.dev/original-images"
FRESHNESS = 2  # seconds between two checks of a cached tag


@dataclass
class Env:
    kube: KubeAPI
    registry: Registry
    images: SampleImages
    cache: Stowage
    operator: Operator
    webhook: dict[str, Any]

    def pod(
        self,
        namespace: str,
        name: str,
        containers: dict[str, str],
        *,
        init: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create a pod (never scheduled: there is no kubelet) and return it as stored."""
        body: dict[str, Any] = {
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "containers": [{"name": n, "image": i} for n, i in containers.items()],
                "initContainers": [{"name": n, "image": i} for n, i in (init or {}).items()],
            },
        }
        return self.kube.ok("POST", f"/api/v1/namespaces/{namespace}/pods", body)  # type: ignore[no-any-return]

    def cached_images(self) -> dict[str, dict[str, Any]]:
        return cached_images(self.kube)

    def wait_cached_image(self, image: str, check: Any, timeout: float = 60) -> dict[str, Any]:
        return wait_cached_image(
            self.kube, image, check, timeout=timeout, log=lambda: self.operator.log_tail(30)
        )


def _images(pod: dict[str, Any], field: str = "containers") -> dict[str, str]:
    return {c["name"]: c["image"] for c in pod["spec"].get(field) or []}


@pytest.fixture(scope="module")
def env(
    kube: KubeAPI,
    registry: Registry,
    images: SampleImages,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("operator")
    token = root / "cache-admin-token"
    token.write_text(secrets.token_hex(24))
    kube.ok("POST", "/api/v1/namespaces", {"metadata": {"name": OPERATOR_NS}})
    with Stowage(
        root / "cache",
        insecure_registries=[registry.host],
        log_file=root / "cache.log",
        tag_ttl=0,  # every tag check reaches the registry
        extra_args=[f"--admin-token-file={token}"],
    ) as cache:
        operator = Operator(
            kube,
            root / "operator",
            namespace=OPERATOR_NS,
            cache_url=cache.url,
            webhook_config=RELEASE,
            peering=RELEASE,
            cert_secret="stowage-webhook-tls",
            extra_args=[
                f"--proxy-address={PROXY}",
                f"--expiry={EXPIRY}s",
                "--exclude=^docker\\.io/library/excluded[:@]",
                "--ignore-namespace=kube-system",
                "--peering-lifetime=10",
                f"--freshness-interval={FRESHNESS}s",
                f"--cache-token-file={token}",
            ],
        )
        webhook = install_cluster_objects(kube, RELEASE, OPERATOR_NS, operator.webhook_url)
        with operator:
            env = Env(kube, registry, images, cache, operator, webhook)
            # The webhook is usable once the operator has patched its CA into the config.
            wait_until(
                lambda: all(
                    h["clientConfig"].get("caBundle")
                    for h in kube.ok(
                        "GET",
                        "/apis/admissionregistration.k8s.io/v1/"
                        f"mutatingwebhookconfigurations/{RELEASE}",
                    )["webhooks"]
                ),
                timeout=30,
                describe=operator.log_tail,
            )
            yield env
            print("--- operator log tail ---\n" + operator.log_tail(80))
        kube.request(
            "DELETE",
            f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{RELEASE}",
        )


def test_images_rewritten_to_the_node_proxy(env: Env, namespace: str) -> None:
    reg = env.registry.host
    digest = "sha256:" + "a" * 64
    pod = env.pod(
        namespace,
        "rewrite",
        {
            "short": "nginx",
            "tagged": "nginx:1.27",
            "pinned": f"nginx@{digest}",
            "both": f"nginx:1.27@{digest}",
            "ported": f"{reg}/library/app:1",
            "ghcr": "ghcr.io/org/tool:2",
            "user": "someone/app",
        },
        init={"setup": "busybox:1.36"},
    )
    prefix = reg.replace(":", "-")
    assert _images(pod) == {
        "short": f"{PROXY}/docker.io/library/nginx:latest",
        "tagged": f"{PROXY}/docker.io/library/nginx:1.27",
        "pinned": f"{PROXY}/docker.io/library/nginx@{digest}",
        "both": f"{PROXY}/docker.io/library/nginx:1.27@{digest}",
        "ported": f"{PROXY}/{prefix}/library/app:1",
        "ghcr": f"{PROXY}/ghcr.io/org/tool:2",
        "user": f"{PROXY}/docker.io/someone/app:latest",
    }
    assert _images(pod, "initContainers") == {"setup": f"{PROXY}/docker.io/library/busybox:1.36"}
    assert json.loads(pod["metadata"]["annotations"][ORIGINAL]) == {
        "short": "nginx",
        "tagged": "nginx:1.27",
        "pinned": f"nginx@{digest}",
        "both": f"nginx:1.27@{digest}",
        "ported": f"{reg}/library/app:1",
        "ghcr": "ghcr.io/org/tool:2",
        "user": "someone/app",
        "setup": "busybox:1.36",
    }


def test_ephemeral_containers_rewritten(env: Env, namespace: str) -> None:
    env.pod(namespace, "debugged", {"main": "nginx:1.27"})
    path = f"/api/v1/namespaces/{namespace}/pods/debugged/ephemeralcontainers"
    pod = env.kube.ok("GET", f"/api/v1/namespaces/{namespace}/pods/debugged")
    pod["spec"]["ephemeralContainers"] = [
        {"name": "debugger", "image": "busybox:1.36", "stdin": True, "tty": True}
    ]
    updated = env.kube.ok("PUT", path, pod)
    assert _images(updated, "ephemeralContainers") == {
        "debugger": f"{PROXY}/docker.io/library/busybox:1.36"
    }
    # That subresource changes ephemeral containers only: the annotation keeps the pod's
    # originals (the debugger's source is read back from its proxied image).
    originals = json.loads(updated["metadata"]["annotations"][ORIGINAL])
    assert originals == {"main": "nginx:1.27"}


def test_left_alone(env: Env, namespace: str) -> None:
    # Opt-out label.
    pod = env.pod(
        namespace, "optout", {"app": "nginx:1.27"}, labels={"stowage.dev/image-caching": "ignore"}
    )
    assert _images(pod) == {"app": "nginx:1.27"}
    assert ORIGINAL not in (pod["metadata"].get("annotations") or {})
    # Exclude regex: only that container is left alone.
    pod = env.pod(namespace, "excluded", {"ex": "excluded:1", "in": "included:1"})
    assert _images(pod) == {"ex": "excluded:1", "in": f"{PROXY}/docker.io/library/included:1"}
    assert json.loads(pod["metadata"]["annotations"][ORIGINAL]) == {"in": "included:1"}
    # Already through the proxy: unchanged, nothing recorded.
    proxied = f"{PROXY}/docker.io/library/nginx:1.27"
    pod = env.pod(namespace, "proxied", {"app": proxied})
    assert _images(pod) == {"app": proxied}
    assert ORIGINAL not in (pod["metadata"].get("annotations") or {})
    # Ignored namespaces: kube-system (configured) and the operator's own.
    for ns in ("kube-system", OPERATOR_NS):
        pod = env.pod(ns, f"ignored-{namespace}", {"app": "nginx:1.27"})
        assert _images(pod) == {"app": "nginx:1.27"}
        env.kube.ok("DELETE", f"/api/v1/namespaces/{ns}/pods/ignored-{namespace}")


def test_cached_image_lifecycle(env: Env, namespace: str) -> None:
    app = push_image(env.registry, "library/life", "1")
    image = f"{env.registry.host}/library/life:1"
    env.pod(namespace, "user-1", {"app": image})
    env.pod(namespace, "user-2", {"app": image, "side": image})

    ci = env.wait_cached_image(
        image,
        lambda ci: (
            (ci.get("status") or {}).get("phase") == "Cached"
            and ci["status"].get("usedBy", {}).get("count") == 2
        ),
    )
    status = ci["status"]
    assert status["digest"] == app.manifest_digest
    assert status["size"] == sum(size for _, size in app.blobs)
    assert status["usedBy"]["pods"] == [f"{namespace}/user-1", f"{namespace}/user-2"]
    assert status["upToDate"] is True and status["upstreamDigest"] == app.manifest_digest
    assert status.get("lastUsed")
    assert "expiresAt" not in ci["spec"]
    assert ci["metadata"]["name"].startswith("127.0.0.1-")
    # The cluster cache fetched every blob once and now serves it without upstream.
    for digest, _ in app.blobs:
        assert env.registry.blob_gets(digest) == 1
        resp = env.cache.get(f"/v2/{env.registry.path_prefix}/library/life/blobs/{digest}")
        assert resp.status == 200
    # Pinned in the cluster cache while the CachedImage exists.
    assert _cache_listing(env, "library/life") == [("1", app.manifest_digest, True)]
    # kubectl shows it with the printer columns.
    out = env.kube.kubectl("get", "ci", ci["metadata"]["name"]).stdout
    assert out.split()[:6] == ["NAME", "IMAGE", "PHASE", "SIZE", "PODS", "EXPIRES"]
    assert "Cached" in out and image in out

    # Pods go → expiresAt is set, phase Expiring, then the CachedImage is deleted.
    for pod in ("user-1", "user-2"):
        env.kube.ok("DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod}?gracePeriodSeconds=0")
    ci = env.wait_cached_image(
        image,
        lambda ci: bool(ci["spec"].get("expiresAt")) and ci["status"].get("phase") == "Expiring",
        timeout=20,
    )
    assert ci["status"]["usedBy"]["count"] == 0
    wait_until(lambda: image not in env.cached_images(), timeout=EXPIRY + 20, interval=0.2)
    metrics = env.operator.metrics()
    expired = re.search(r"^stowage_operator_expired_total (\S+)$", metrics, re.MULTILINE)
    assert expired is not None and float(expired[1]) >= 1, metrics
    assert 'stowage_operator_admissions_total{result="rewritten"}' in metrics
    assert 'stowage_operator_prefetches_total{result="ok"}' in metrics
    # Released in the cluster cache: no name, no pin; its garbage collection reclaims it.
    wait_until(lambda: _cache_listing(env, "library/life") == [], timeout=10)


def _cache_listing(env: Env, repository: str) -> list[tuple[str | None, str, bool]]:
    out = run_cli("cache", "ls", "--json", "--data", str(env.cache.data_dir))
    assert out.returncode == 0, out.stderr
    return [
        (row["tag"], row["digest"], row["pinned"])
        for row in json.loads(out.stdout)
        if row["repository"] == repository
    ]


def test_retain_keeps_an_unused_image(env: Env) -> None:
    image = f"{env.registry.host}/library/dockerv2:1"
    create_cached_image(env.kube, "kept-dockerv2", image)
    ci = env.wait_cached_image(image, lambda ci: (ci.get("status") or {}).get("phase") == "Cached")
    assert ci["status"]["digest"] == env.images.dockerv2.manifest_digest
    time.sleep(EXPIRY + 3)
    ci = env.cached_images()[image]
    assert ci["status"]["phase"] == "Cached"
    env.kube.ok("DELETE", f"{CI_PATH}/kept-dockerv2")


def test_moved_tag_is_noticed_and_recached(env: Env) -> None:
    first = push_image(env.registry, "library/fresh", "1", seed="fresh-1")
    image = f"{env.registry.host}/library/fresh:1"
    create_cached_image(env.kube, "fresh", image)
    ci = env.wait_cached_image(image, lambda ci: (ci.get("status") or {}).get("phase") == "Cached")
    assert ci["status"]["digest"] == first.manifest_digest
    checked = ci["status"]["lastChecked"]
    since = env.registry.checkpoint()
    # Unchanged upstream: checks go on (HEAD only), the image stays up to date.
    ci = env.wait_cached_image(image, lambda ci: ci["status"]["lastChecked"] != checked)
    assert ci["status"]["upToDate"] is True
    assert env.registry.count("HEAD", "/library/fresh/manifests/1", since=since) >= 1
    assert env.registry.count("GET", "/library/fresh/manifests/1", since=since) == 0
    # A pin the cache lost comes back with the next check.
    out = run_cli("cache", "unpin", image, "--data", str(env.cache.data_dir))
    assert out.returncode == 0, out.stderr  # was pinned, is not now
    wait_until(
        lambda: _cache_listing(env, "library/fresh") == [("1", first.manifest_digest, True)],
        timeout=FRESHNESS * 5,
    )

    moved = push_image(env.registry, "library/fresh", "1", seed="fresh-2")
    assert moved.manifest_digest != first.manifest_digest
    ci = env.wait_cached_image(
        image, lambda ci: ci["status"].get("digest") == moved.manifest_digest, timeout=30
    )
    assert ci["status"]["upstreamDigest"] == moved.manifest_digest
    assert ci["status"]["upToDate"] is True
    assert ci["status"]["phase"] == "Cached"
    assert ci["status"]["size"] == sum(size for _, size in moved.blobs)
    for digest, _ in moved.blobs:
        assert env.registry.blob_gets(digest) == 1  # the cache now holds the new version
    env.kube.ok("DELETE", f"{CI_PATH}/fresh")


def test_prefetch_failure_is_reported_and_retried(env: Env) -> None:
    image = f"{env.registry.host}/library/no-such-image:1"
    create_cached_image(env.kube, "missing", image)
    ci = env.wait_cached_image(
        image, lambda ci: (ci.get("status") or {}).get("retries", 0) >= 2, timeout=60
    )
    assert ci["status"]["phase"] == "Failed"
    assert "404" in ci["status"]["lastError"]
    env.kube.ok("DELETE", f"{CI_PATH}/missing")


def test_webhook_down_admits_pods_unchanged(env: Env, namespace: str) -> None:
    env.operator.stop()
    try:
        pod = env.pod(namespace, "while-down", {"app": "nginx:1.27"})
        assert _images(pod) == {"app": "nginx:1.27"}
    finally:
        env.operator.start()
    pod = env.pod(namespace, "after-restart", {"app": "nginx:1.27"})
    assert _images(pod) == {"app": f"{PROXY}/docker.io/library/nginx:1.27"}
