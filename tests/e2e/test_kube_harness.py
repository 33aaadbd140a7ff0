"""The e2e harness itself: a real kube-apiserver that stores, validates and authorises."""

from __future__ import annotations

from tests.support.kube import KubeAPI


def test_apiserver_serves_and_authorises(kube: KubeAPI, namespace: str) -> None:
    version = kube.ok("GET", "/version")
    assert version["gitVersion"].startswith("v1.")
    cm = {"metadata": {"name": "probe"}, "data": {"k": "v"}}
    kube.ok("POST", f"/api/v1/namespaces/{namespace}/configmaps", cm)
    got = kube.ok("GET", f"/api/v1/namespaces/{namespace}/configmaps/probe")
    assert got["data"] == {"k": "v"}
    # Validation is real: an invalid name is refused.
    status, _ = kube.request(
        "POST", f"/api/v1/namespaces/{namespace}/configmaps", {"metadata": {"name": "Bad_Name"}}
    )
    assert status == 422
    # Authentication is real: a wrong token is refused.
    status, _ = kube.request("GET", "/api/v1/namespaces", token="wrong")
    assert status == 401
    out = kube.kubectl("get", "configmap", "probe", "-n", namespace, "-o", "name").stdout
    assert out.strip() == "configmap/probe"
