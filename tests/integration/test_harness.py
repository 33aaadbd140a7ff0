"""Self-tests for the integration harness (no stowage involved).

If these fail, stowage integration test failures are not to be trusted.
"""

from __future__ import annotations

import json
import socket
import textwrap
import urllib.parse
from pathlib import Path

import jwt
import pytest

from tests.conftest import FaultFactory, RegistryFactory, SampleImages
from tests.support.containerd import Containerd, write_hosts_toml
from tests.support.images import (
    build_image_layout,
    build_index_layout,
    push_image,
)
from tests.support.regclient import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
    sha256_digest,
)
from tests.support.registry import Registry, TokenUser
from tests.support.stowage import Stowage, metric_value
from tests.support.util import HarnessError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _connection_refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# --- registry modes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "tls"),
    [("plain", False), ("plain", True), ("basic", True), ("token", False), ("token", True)],
)
def test_registry_starts_in_each_mode(
    registry_factory: RegistryFactory, mode: str, tls: bool
) -> None:
    reg = registry_factory(mode, tls=tls)
    assert reg.url == f"{'https' if tls else 'http'}://127.0.0.1:{reg.port}"
    assert reg.path_prefix == f"127.0.0.1-{reg.port}"
    assert (reg.ca_file is not None) == tls

    # The client verifies the server cert against our CA, so TLS setups are checked too.
    assert reg.client().ping().status == 200
    # raw(): no challenge handling (in token mode an anonymous token would open /v2/).
    anonymous = RegistryClient(reg.url, ca_file=reg.ca_file).raw("GET", "/v2/")
    if mode == "plain":
        assert anonymous.status == 200
    else:
        assert anonymous.status == 401
        challenge = anonymous.header("WWW-Authenticate") or ""
        assert challenge.lower().startswith("basic" if mode == "basic" else "bearer")
        assert reg.client("harness-admin", "wrong-password").ping().status == 401


def test_basic_registry_push_and_pull_with_credentials(registry_factory: RegistryFactory) -> None:
    reg = registry_factory("basic", users={"alice": "alice-pw"})
    pushed = push_image(reg, "private/app", "v1")
    resp = reg.client("alice", "alice-pw").get_manifest("private/app", "v1")
    assert resp.status == 200
    assert sha256_digest(resp.body) == pushed.manifest_digest
    assert (
        RegistryClient(reg.url, ca_file=reg.ca_file).get_manifest("private/app", "v1").status == 401
    )


# --- images -----------------------------------------------------------------------------


def _verify_blobs(client: RegistryClient, repository: str, blobs: list[tuple[str, int]]) -> None:
    for digest, size in blobs:
        resp = client.get_blob(repository, digest)
        assert resp.status == 200, (digest, resp.status)
        assert len(resp.body) == size
        assert sha256_digest(resp.body) == digest


def test_images_pushed_and_read_back(registry: Registry, images: SampleImages) -> None:
    client = registry.client()
    expected = [
        (images.app, OCI_MANIFEST),
        (images.multi, OCI_INDEX),
        (images.dockerv2, DOCKER_MANIFEST),
    ]
    for image, media_type in expected:
        assert image.media_type == media_type
        assert image.registry_host == registry.host
        resp = client.get_manifest(image.repository, image.tag or image.manifest_digest)
        assert resp.status == 200
        assert resp.body == image.manifest_bytes
        assert sha256_digest(resp.body) == image.manifest_digest
        assert resp.header("Docker-Content-Digest") == image.manifest_digest
        assert json.loads(resp.body)["mediaType"] == media_type
        _verify_blobs(client, image.repository, image.blobs)

    assert [len(i.layers) for i in (images.app, images.dockerv2)] == [2, 2]
    assert images.app.all_blobs == images.app.blobs

    # Index: one manifest per platform, each with its own (distinct) layers.
    multi = images.multi
    assert multi.blobs == []
    assert {c.platform for c in multi.children} == {"linux/amd64", "linux/arm64"}
    for child in multi.children:
        assert child.media_type == OCI_MANIFEST
        assert child.tag is None
        by_digest = client.get_manifest(multi.repository, child.manifest_digest)
        assert sha256_digest(by_digest.body) == child.manifest_digest
        _verify_blobs(client, multi.repository, child.blobs)
    amd, arm = multi.child("linux/amd64"), multi.child("linux/arm64")
    assert not set(amd.layers) & set(arm.layers)
    assert len(multi.all_blobs) == len(amd.blobs) + len(arm.blobs)


def test_image_layouts_are_deterministic(tmp_path: Path) -> None:
    a = build_image_layout(tmp_path / "a", "t", layer_sizes=[1000, 2000], seed="s")
    b = build_image_layout(tmp_path / "b", "t", layer_sizes=[1000, 2000], seed="s")
    c = build_image_layout(tmp_path / "c", "t", layer_sizes=[1000, 2000], seed="other")
    index = "index.json"
    assert (a / index).read_bytes() == (b / index).read_bytes()
    assert (a / index).read_bytes() != (c / index).read_bytes()
    blobs = sorted(p.name for p in (a / "blobs" / "sha256").iterdir())
    for name in blobs:
        data = (a / "blobs" / "sha256" / name).read_bytes()
        assert sha256_digest(data) == f"sha256:{name}"
    multi = build_index_layout(tmp_path / "m", "t", layer_sizes=[100])
    # 2 platforms x (1 layer + config + manifest) + the index itself
    assert len(list((multi / "blobs" / "sha256").iterdir())) == 7


# --- access-log counting ------------------------------------------------------------------


def test_access_log_counts_exactly(registry: Registry, images: SampleImages) -> None:
    client = registry.client()
    digest, _ = images.app.layers[0]
    other, _ = images.app.layers[1]
    missing = "sha256:" + "0" * 64
    since = registry.checkpoint()

    for _ in range(3):
        assert client.get_blob("library/app", digest).status == 200
    assert client.get_blob("library/app", digest, method="HEAD").status == 200
    assert client.get_blob("library/app", other).status == 200
    assert client.get_blob("library/app", missing).status == 404
    assert client.get_manifest("library/app", "1").status == 200

    assert registry.count("GET", f"/blobs/{digest}", since=since) == 3
    assert registry.blob_gets(digest, since=since) == 3
    assert registry.count("HEAD", f"/blobs/{digest}", since=since) == 1
    assert registry.count("*", f"/blobs/{digest}", since=since) == 4
    assert registry.count("GET", "/blobs/", since=since) == 5
    assert registry.count("GET", "/blobs/", status=404, since=since) == 1
    assert registry.count("GET", "/library/app/manifests/1", since=since) == 1
    # Counting again must not count the harness's own sync requests.
    assert registry.count("GET", "/v2/", since=since) == 6
    entries = registry.requests()[since:]
    assert [e.method for e in entries] == ["GET"] * 3 + ["HEAD"] + ["GET"] * 3


# --- outages ------------------------------------------------------------------------------


def test_restart_on_same_port_keeps_content(registry_factory: RegistryFactory) -> None:
    reg = registry_factory("plain")
    port = reg.port
    pushed = push_image(reg, "library/restart", "1")
    gets_before = reg.count("GET", "/manifests/")

    reg.stop()
    assert not reg.running()
    assert _connection_refused("127.0.0.1", port)
    reg.start()
    assert reg.port == port
    resp = reg.client().get_manifest("library/restart", "1")
    assert sha256_digest(resp.body) == pushed.manifest_digest

    reg.kill()
    assert _connection_refused("127.0.0.1", port)
    reg.start()
    _verify_blobs(reg.client(), "library/restart", pushed.blobs)
    # The access log is appended across restarts.
    assert reg.count("GET", "/manifests/") == gets_before + 1


def test_fault_server_replaces_stopped_registry(
    registry_factory: RegistryFactory, fault_server: FaultFactory
) -> None:
    reg = registry_factory("plain")
    reg.stop()
    fault = fault_server(reg.port, status=500, body="boom")
    client = RegistryClient(reg.url)

    resp = client.get_manifest("library/app", "1")
    assert (resp.status, resp.body) == (500, b"boom")
    assert client.get_blob("library/app", "sha256:" + "1" * 64, method="HEAD").status == 500

    fault.set_response(429, headers={"Retry-After": "7"})
    resp = client.get_manifest("library/app", "1")
    assert resp.status == 429
    assert resp.header("Retry-After") == "7"
    fault.set_response(503)
    assert client.ping().status == 503

    assert fault.request_count == 4
    assert fault.count("GET", "/manifests/") == 2
    assert fault.count("HEAD") == 1
    assert fault.requests[0].path_qs == "/v2/library/app/manifests/1"

    # Registry comes back on the same port once the fault server is gone.
    with pytest.raises(HarnessError, match="busy"):
        reg.start()
    fault.stop()
    reg.start()
    assert reg.client().ping().status == 200


def test_fault_server_default_429_has_retry_after(fault_server: FaultFactory) -> None:
    fault = fault_server(status=429)
    resp = RegistryClient(fault.url).ping()
    assert resp.status == 429
    assert resp.header("Retry-After") == "1"


# --- token issuer -------------------------------------------------------------------------


def test_token_issuer_policies(registry_factory: RegistryFactory) -> None:
    reg = registry_factory(
        "token",
        users={
            "alice": TokenUser("alice-pw", {"team/*": ["pull"]}),
            "bob": TokenUser("bob-pw", {"other/*": ["pull"]}),
        },
        anonymous={"public/*": ["pull"]},
    )
    public = push_image(reg, "public/app", "1", layer_sizes=[512])
    team = push_image(reg, "team/app", "1", layer_sizes=[512])
    issuer = reg.token_issuer
    assert issuer is not None

    anon = RegistryClient(reg.url)
    assert anon.get_manifest("public/app", "1").status == 200
    _verify_blobs(anon, "public/app", public.blobs)
    assert anon.get_manifest("team/app", "1").status == 401

    alice = reg.client("alice", "alice-pw")
    resp = alice.get_manifest("team/app", "1")
    assert resp.status == 200
    assert sha256_digest(resp.body) == team.manifest_digest
    assert alice.get_manifest("public/app", "1").status == 401  # not in alice's policy

    bob = reg.client("bob", "bob-pw")
    assert bob.get_manifest("team/app", "1").status == 401
    events = issuer.events()
    bob_event = [e for e in events if e.get("user") == "bob"][-1]
    assert bob_event["requested"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull"]}
    ]
    assert bob_event["granted"] == []

    # Wrong password is rejected by the issuer itself.
    challenge = anon.raw("GET", "/v2/team/app/manifests/1").header("WWW-Authenticate") or ""
    assert 'service="stowage-test-registry"' in challenge
    assert 'scope="repository:team/app:pull"' in challenge
    before = issuer.count("GET", "/token")
    bad = RegistryClient(reg.url, username="alice", password="nope")
    assert bad.get_manifest("team/app", "1").status == 401
    assert issuer.count("GET", "/token") == before + 1
    assert reg.count("GET", "/team/app/manifests/1", status=401) >= 3


def test_token_issuer_oauth2_post_and_refresh(registry_factory: RegistryFactory) -> None:
    reg = registry_factory(
        "token", users={"alice": TokenUser("alice-pw", {"team/*": ["pull"]})}, token_expires_in=60
    )
    push_image(reg, "team/app", "1", layer_sizes=[256])
    issuer = reg.token_issuer
    assert issuer is not None
    client = RegistryClient(issuer.url)
    scope = "repository:team/app:pull"

    def post(form: dict[str, str]) -> dict[str, object]:
        resp = client.raw(
            "POST",
            "/token",
            {"Content-Type": "application/x-www-form-urlencoded"},
            urllib.parse.urlencode(form).encode(),
        )
        assert resp.status == 200, resp.body
        body: dict[str, object] = resp.json()
        return body

    body = post(
        {
            "grant_type": "password",
            "username": "alice",
            "password": "alice-pw",
            "service": "stowage-test-registry",
            "scope": scope,
            "client_id": "test",
            "access_type": "offline",
        }
    )
    assert body["scope"] == scope
    assert body["expires_in"] == 60
    refresh = body["refresh_token"]
    assert isinstance(refresh, str)
    claims = jwt.decode(str(body["access_token"]), options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["aud"] == "stowage-test-registry"
    header = jwt.get_unverified_header(str(body["access_token"]))
    assert header["alg"] == "RS256"
    assert len(header["x5c"]) == 1

    body = post(
        {
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": "stowage-test-registry",
            "scope": scope,
            "client_id": "test",
        }
    )
    token = str(body["access_token"])
    resp = RegistryClient(reg.url).raw(
        "GET",
        "/v2/team/app/manifests/1",
        {"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST},
    )
    assert resp.status == 200

    bad = client.raw(
        "POST",
        "/token",
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"grant_type=password&username=alice&password=x&service=s&client_id=t",
    )
    assert bad.status == 401


# --- stowage wrapper (against a stand-in module, not the real stowage) ---------------------

_FAKE_STOWAGE = textwrap.dedent(
    """
    import argparse, os, sys
    from aiohttp import web

    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("--listen")
    p.add_argument("--data")
    p.add_argument("--log-format")
    p.add_argument("--insecure-registry", action="append", default=[])
    p.add_argument("--tag-ttl")
    a = p.parse_args()
    if os.environ.get("FAKE_CRASH"):
        print("fatal: simulated startup failure", file=sys.stderr)
        sys.exit(3)
    host, port = a.listen.rsplit(":", 1)
    print("args", a, flush=True)
    METRICS = '''# HELP stowage_requests_total Requests.
    # TYPE stowage_requests_total counter
    stowage_requests_total{route="manifest",status="200"} 3.0
    stowage_requests_total{route="blob",status="200"} 4.0
    stowage_requests_total{route="blob",status="404"} 1.0
    # HELP stowage_cache_bytes Bytes.
    # TYPE stowage_cache_bytes gauge
    stowage_cache_bytes 1234.0
    '''

    async def readyz(r): return web.Response(text="ok")
    async def metrics(r): return web.Response(text=METRICS)
    app = web.Application()
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    web.run_app(app, host=host, port=int(port), print=None)
    """
)


@pytest.fixture
def fake_stowage_path(tmp_path: Path) -> Path:
    pkg = tmp_path / "fake" / "stowage"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(_FAKE_STOWAGE)
    return tmp_path / "fake"


def test_stowage_wrapper_lifecycle_and_metrics(fake_stowage_path: Path, tmp_path: Path) -> None:
    # PYTHONPATH puts the stand-in package ahead of the installed stowage.
    env = {"PYTHONPATH": str(fake_stowage_path)}
    st = Stowage(
        tmp_path / "data",
        insecure_registries=["127.0.0.1:5000"],
        tag_ttl=30,
        env=env,
        log_file=tmp_path / "s.log",
    ).start()
    try:
        assert st.get("/readyz").status == 200
        assert "--insecure-registry" in st.argv and "30" in st.argv
        assert st.metric("stowage_requests", route="blob") == 5.0
        assert st.metric("stowage_requests_total", route="blob", status="404") == 1.0
        assert st.metric("stowage_requests") == 8.0
        assert st.metric("stowage_cache_bytes") == 1234.0
        assert st.metric("stowage_missing") == 0.0
        m = st.metrics()
        key = ("stowage_requests_total", frozenset({("route", "manifest"), ("status", "200")}))
        assert m[key] == 3.0
        assert metric_value(m, "stowage_requests", route="manifest") == 3.0

        port = st.port
        st.restart()
        assert st.port == port and st.get("/readyz").status == 200
        st.kill9()
        assert _connection_refused("127.0.0.1", port)
        st.start()
        st.stop()
        assert not st.running()
        assert "args" in st.log_text()
    finally:
        st.stop()


def test_stowage_wrapper_reports_startup_failure(fake_stowage_path: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(fake_stowage_path), "FAKE_CRASH": "1"}
    st = Stowage(tmp_path / "data", env=env, log_file=tmp_path / "s.log")
    with pytest.raises(HarnessError, match="simulated startup failure"):
        st.start()


# --- containerd ---------------------------------------------------------------------------


def test_containerd_pulls_directly_from_registry(
    containerd: Containerd, registry: Registry, images: SampleImages
) -> None:
    write_hosts_toml(containerd.hosts_dir, registry.host)
    since = registry.checkpoint()
    result = containerd.pull(images.app.ref)
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(images.app.ref) == images.app.manifest_digest
    for digest, _ in images.app.blobs:
        assert registry.blob_gets(digest, since=since) == 1
    assert {d for d, _ in images.app.blobs} <= containerd.content_digests()


def test_containerd_mirror_gets_ns_param_and_falls_back(
    containerd: Containerd, registry: Registry, images: SampleImages, fault_server: FaultFactory
) -> None:
    mirror = fault_server(status=503)
    write_hosts_toml(containerd.hosts_dir, registry.host, mirror.url)
    result = containerd.pull(images.multi.ref)
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(images.multi.ref) == images.multi.manifest_digest
    first = mirror.requests[0]
    assert first.method == "HEAD"
    assert first.path_qs == f"/v2/library/multi/manifests/1?ns={urllib.parse.quote(registry.host)}"
    assert all("ns=" in r.path_qs for r in mirror.requests)
