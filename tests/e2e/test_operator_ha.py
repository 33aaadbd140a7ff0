"""Two operator replicas: both serve the webhook, one runs the controllers, and the other
takes over when it dies (kopf peering through the chart's ClusterKopfPeering)."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import SampleImages
from tests.support.kube import KubeAPI
from tests.support.operators import (
    CI_PATH,
    Operator,
    create_cached_image,
    install_cluster_objects,
    wait_cached_image,
)
from tests.support.registry import Registry
from tests.support.stowage import Stowage
from tests.support.util import wait_until

pytestmark = pytest.mark.integration

RELEASE = "stowage-ha"
NS = "stowage-ha"
LIFETIME = 6  # seconds a dead leader's peering record keeps the follower waiting
PROXY = "localhost:7439"
PEERINGS = "/apis/kopf.dev/v1/clusterkopfpeerings"


@pytest.fixture(scope="module")
def replicas(
    kube: KubeAPI, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Operator, Operator, Stowage]]:
    root = tmp_path_factory.mktemp("operator-ha")
    kube.ok("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
    with Stowage(root / "cache", insecure_registries=[registry.host]) as cache:
        common: dict[str, Any] = {
            "namespace": NS,
            "cache_url": cache.url,
            "webhook_config": RELEASE,
            "peering": RELEASE,
            "cert_secret": f"{RELEASE}-webhook-tls",
            "extra_args": [f"--peering-lifetime={LIFETIME}", f"--proxy-address={PROXY}"],
        }
        a = Operator(kube, root / "a", **common)
        b = Operator(kube, root / "b", **common)
        install_cluster_objects(kube, RELEASE, NS, a.webhook_url)
        # Not through the apiserver: both replicas are asked directly below.
        kube.request(
            "DELETE",
            f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{RELEASE}",
        )
        with a, b:
            yield a, b, cache
            for op in (a, b):
                print(f"--- {op.workdir.name} log tail ---\n{op.log_tail(40)}")


def _leading(op: Operator) -> bool:
    """Whether kopf's last word on peering in ``op``'s log was to run. A replica starts
    paused and says nothing while it stays so; it says "Resuming" when it may run and
    "Pausing" when a higher-priority replica appears."""
    lines = [
        line
        for line in op.log_text().splitlines()
        if "Resuming operations" in line or "Pausing operations" in line
    ]
    return bool(lines) and "Resuming operations" in lines[-1]


def _peers(kube: KubeAPI) -> int:
    status, peering = kube.request("GET", f"{PEERINGS}/{RELEASE}")
    return len((peering.get("status") or {}) if status == 200 else {})


def _admission_review(op: Operator, ca: bytes, image: str) -> dict[str, Any]:
    """An AdmissionReview sent straight to one replica's webhook, as the apiserver would."""
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "direct",
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {"username": "test"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "direct", "namespace": "default"},
                "spec": {"containers": [{"name": "app", "image": image}]},
            },
            "dryRun": False,
        },
    }
    ctx = ssl.create_default_context(cadata=ca.decode())
    req = urllib.request.Request(
        op.webhook_url,
        data=json.dumps(review).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return json.loads(resp.read())["response"]  # type: ignore[no-any-return]


def test_one_leader_both_serve_the_webhook_and_the_other_takes_over(
    kube: KubeAPI,
    registry: Registry,
    images: SampleImages,
    replicas: tuple[Operator, Operator, Stowage],
) -> None:
    a, b, _ = replicas
    # Both replicas recorded in the peering object; then exactly one runs.
    wait_until(lambda: _peers(kube) == 2, timeout=30)
    wait_until(
        lambda: _leading(a) != _leading(b),
        timeout=30,
        describe=lambda: str(kube.request("GET", f"{PEERINGS}/{RELEASE}")[1]),
    )
    leader, follower = (a, b) if _leading(a) else (b, a)

    # Both serve the webhook (same certificate, from the shared Secret).
    secret = kube.ok("GET", f"/api/v1/namespaces/{NS}/secrets/{RELEASE}-webhook-tls")
    ca = base64.b64decode(secret["data"]["ca.crt"])
    for op in (leader, follower):
        response = _admission_review(op, ca, "nginx:1.27")
        assert response["allowed"] is True
        patch = json.loads(base64.b64decode(response["patch"]))
        images_ = [p["value"] for p in patch if p["path"].endswith("/image")] or [
            c["image"] for p in patch if p["path"] == "/spec/containers" for c in p["value"]
        ]
        assert images_ == [f"{PROXY}/docker.io/library/nginx:1.27"], patch

    # Only the leader runs the controllers.
    first = f"{registry.host}/library/app:1"
    create_cached_image(kube, "ha-first", first)
    ci = wait_cached_image(kube, first, _cached)
    assert ci["status"]["digest"] == images.app.manifest_digest
    assert "ha-first" in leader.log_text() or first in leader.log_text()
    assert first not in follower.log_text()

    # The leader dies without a word; the follower resumes after its record expires.
    leader.kill9()
    second = f"{registry.host}/library/dockerv2:1"
    create_cached_image(kube, "ha-second", second)
    ci = wait_cached_image(kube, second, _cached, timeout=LIFETIME + 60)
    assert ci["status"]["digest"] == images.dockerv2.manifest_digest
    assert "Resuming operations" in follower.log_text()
    for name in ("ha-first", "ha-second"):
        kube.request("DELETE", f"{CI_PATH}/{name}")


def _cached(ci: dict[str, Any]) -> bool:
    return (ci.get("status") or {}).get("phase") == "Cached"
