"""Pulling through stowage with real clients (skopeo, containerd, raw HTTP) and the exact
protocol behaviour a registry client relies on: bytes, headers, ranges, routing modes,
cache hits and persistence across restarts."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RegistryFactory, SampleImages, StowageFactory
from tests.support.containerd import Containerd, write_hosts_toml
from tests.support.images import PushedImage, push_image
from tests.support.regclient import (
    ACCEPT_ALL_MANIFESTS,
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Response,
    sha256_digest,
)
from tests.support.registry import Registry
from tests.support.stowage import Stowage

pytestmark = pytest.mark.integration


# --- local helpers ------------------------------------------------------------------------


def _skopeo_from_stowage(
    stowage: Stowage,
    name: str,
    dest: Path,
    *,
    all_images: bool = False,
    arch: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy docker://<stowage>/<name> dir:<dest>`` isolated from host config."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo not installed")
    with tempfile.TemporaryDirectory(prefix="skopeo-") as tmp:
        conf = Path(tmp) / "registries.conf"
        conf.write_text("")
        argv = [skopeo, "--insecure-policy", "--registries-conf", str(conf)]
        if arch is not None:
            argv += ["--override-os", "linux", "--override-arch", arch]
        argv += ["copy", "--src-tls-verify=false", "--src-no-creds"]
        if all_images:
            argv.append("--all")
        argv += [f"docker://{stowage.host}/{name}", f"dir:{dest}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout}{proc.stderr}"
    return proc


def _prefixed(registry: Registry, repository: str) -> str:
    return f"{registry.path_prefix}/{repository}"


def _assert_dir_holds(dest: Path, image: PushedImage) -> None:
    """skopeo's ``dir:`` layout: blobs named by hex digest, each verifying."""
    for digest, size in image.blobs:
        data = (dest / digest.removeprefix("sha256:")).read_bytes()
        assert len(data) == size
        assert sha256_digest(data) == digest


def _get(stowage: Stowage, path: str, headers: dict[str, str] | None = None) -> Response:
    return stowage.client().raw("GET", path, headers)


def _head(stowage: Stowage, path: str, headers: dict[str, str] | None = None) -> Response:
    return stowage.client().raw("HEAD", path, headers)


def _manifest_path(registry: Registry, image: PushedImage, ref: str) -> str:
    return f"/v2/{_prefixed(registry, image.repository)}/manifests/{ref}"


def _blob_path(registry: Registry, repository: str, digest: str) -> str:
    return f"/v2/{_prefixed(registry, repository)}/blobs/{digest}"


def _pull_raw(stowage: Stowage, name: str, image: PushedImage, ref: str | None = None) -> None:
    """Manifest by tag (or ``ref``) plus every blob, each checked against upstream."""
    resp = _get(
        stowage, f"/v2/{name}/manifests/{ref or image.tag}", {"Accept": ACCEPT_ALL_MANIFESTS}
    )
    assert resp.status == 200, resp.body
    assert resp.body == image.manifest_bytes
    for digest, _ in image.blobs:
        blob = _get(stowage, f"/v2/{name}/blobs/{digest}")
        assert blob.status == 200, blob.body
        assert sha256_digest(blob.body) == digest


def _request_logs(stowage: Stowage) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in stowage.log_text().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("event") == "request":
            out.append(obj)
    return out


def _blob_bytes(image: PushedImage) -> int:
    return sum(size for _, size in image.blobs)


def _no_upstream_blob_gets(
    registry: Registry, blobs: Sequence[tuple[str, int]], since: int
) -> None:
    got = {d: registry.blob_gets(d, since=since) for d, _ in blobs}
    assert all(n == 0 for n in got.values()), f"upstream blob GETs: {got}"


# --- skopeo through stowage ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["app", "dockerv2"])
def test_skopeo_copy_single_image(
    which: str,
    registry: Registry,
    images: SampleImages,
    stowage_factory: StowageFactory,
    tmp_path: Path,
) -> None:
    image: PushedImage = getattr(images, which)
    st = stowage_factory(upstreams=[registry])
    dest = tmp_path / "out"
    _skopeo_from_stowage(st, f"{_prefixed(registry, image.repository)}:1", dest)
    # Untouched manifest (OCI stays OCI, Docker v2s2 stays v2s2) and every blob verified.
    assert (dest / "manifest.json").read_bytes() == image.manifest_bytes
    assert json.loads(image.manifest_bytes)["mediaType"] == image.media_type
    _assert_dir_holds(dest, image)
    assert st.metric("stowage_requests_total", route="blobs", result="miss") == len(image.blobs)


def test_skopeo_copy_multi_arch_all(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    multi = images.multi
    st = stowage_factory(upstreams=[registry])
    dest = tmp_path / "out"
    _skopeo_from_stowage(st, f"{_prefixed(registry, multi.repository)}:1", dest, all_images=True)
    assert (dest / "manifest.json").read_bytes() == multi.manifest_bytes
    for child in multi.children:
        hex_digest = child.manifest_digest.removeprefix("sha256:")
        assert (dest / f"{hex_digest}.manifest.json").read_bytes() == child.manifest_bytes
        _assert_dir_holds(dest, child)


def test_single_platform_pull_fetches_only_that_platform(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    multi = images.multi
    amd, arm = multi.child("linux/amd64"), multi.child("linux/arm64")
    st = stowage_factory(upstreams=[registry])
    since = registry.checkpoint()
    dest = tmp_path / "out"
    _skopeo_from_stowage(st, f"{_prefixed(registry, multi.repository)}:1", dest, arch="arm64")

    assert (dest / "manifest.json").read_bytes() == arm.manifest_bytes
    _assert_dir_holds(dest, arm)
    # Upstream saw the index, the arm64 manifest and arm64 blobs (each once) - nothing amd64.
    assert registry.count("GET", f"/{multi.repository}/manifests/1", since=since) == 1
    assert registry.count("GET", f"/manifests/{arm.manifest_digest}", since=since) == 1
    assert registry.count("*", f"/manifests/{amd.manifest_digest}", since=since) == 0
    for digest, _ in arm.blobs:
        assert registry.blob_gets(digest, since=since) == 1
    for digest, _ in amd.blobs:
        assert registry.count("*", f"/blobs/{digest}", since=since) == 0
    assert not any(
        (st.data_dir / "blobs" / "sha256" / d[7:9] / d[7:]).exists() for d, _ in amd.blobs
    )


# --- exact bytes and headers --------------------------------------------------------------


def _assert_same_manifest_headers(resp: Response, upstream: Response, image: PushedImage) -> None:
    assert resp.header("Content-Type") == upstream.header("Content-Type")
    assert resp.header("Docker-Content-Digest") == image.manifest_digest
    assert resp.header("Content-Length") == str(len(image.manifest_bytes))


@pytest.mark.parametrize("which", ["app", "multi", "dockerv2"])
def test_manifest_bytes_and_headers_match_upstream(
    which: str, registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    image: PushedImage = getattr(images, which)
    upstream = registry.client().get_manifest(image.repository, "1")
    assert upstream.body == image.manifest_bytes
    st = stowage_factory(upstreams=[registry])
    by_tag = _manifest_path(registry, image, "1")
    by_digest = _manifest_path(registry, image, image.manifest_digest)
    accept = {"Accept": ACCEPT_ALL_MANIFESTS}

    # First contact is a HEAD (as containerd resolves): full headers, no body.
    head = _head(st, by_tag, accept)
    assert head.status == 200
    assert head.body == b""
    _assert_same_manifest_headers(head, upstream, image)

    for path in (by_tag, by_tag, by_digest):
        resp = _get(st, path, accept)
        assert resp.status == 200
        assert resp.body == image.manifest_bytes
        _assert_same_manifest_headers(resp, upstream, image)
        head = _head(st, path, accept)
        assert (head.status, head.body) == (200, b"")
        _assert_same_manifest_headers(head, upstream, image)

    # A fresh stowage asked by digest first also answers exactly.
    st2 = stowage_factory(upstreams=[registry])
    resp = _get(st2, by_digest, accept)
    assert resp.body == image.manifest_bytes
    _assert_same_manifest_headers(resp, upstream, image)


@pytest.mark.parametrize(
    ("which", "accept"),
    [("app", DOCKER_MANIFEST), ("dockerv2", OCI_MANIFEST), ("app", OCI_MANIFEST)],
)
def test_narrow_accept_gets_unconverted_manifest(
    which: str,
    accept: str,
    registry: Registry,
    images: SampleImages,
    stowage_factory: StowageFactory,
) -> None:
    image: PushedImage = getattr(images, which)
    upstream = registry.client().get_manifest(image.repository, "1")
    st = stowage_factory(upstreams=[registry])
    # Uncached (first request carries the narrow Accept) and cached.
    for _ in range(2):
        resp = _get(st, _manifest_path(registry, image, "1"), {"Accept": accept})
        assert resp.status == 200
        assert resp.body == image.manifest_bytes
        _assert_same_manifest_headers(resp, upstream, image)


def test_blob_bytes_and_headers_cached_and_uncached(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    app = images.app
    st = stowage_factory(upstreams=[registry])
    up = registry.client()

    # GET (uncached, then cached) and HEAD (cached): upstream's bytes and headers.
    for digest, size in (app.blobs[0], app.layers[0]):
        upstream = up.get_blob(app.repository, digest)
        path = _blob_path(registry, app.repository, digest)
        for state in ("uncached", "cached"):
            resp = _get(st, path)
            assert resp.status == 200, state
            assert resp.body == upstream.body
            assert resp.header("Content-Length") == str(size), state
            assert resp.header("Docker-Content-Digest") == digest, state
            assert resp.header("Content-Type") == upstream.header("Content-Type"), state
        head = _head(st, path)
        assert (head.status, head.body) == (200, b"")
        assert head.header("Content-Length") == str(size)
        assert head.header("Docker-Content-Digest") == digest
        assert head.header("Content-Type") == upstream.header("Content-Type")
    assert st.metric("stowage_requests_total", route="blobs", result="hit") == 4

    # HEAD on an uncached blob: same headers (size from upstream), no body.
    digest, size = app.layers[1]
    upstream = up.get_blob(app.repository, digest, method="HEAD")
    head = _head(st, _blob_path(registry, app.repository, digest))
    assert (head.status, head.body) == (200, b""), head.status
    assert head.header("Content-Length") == str(size)
    assert head.header("Docker-Content-Digest") == digest
    assert head.header("Content-Type") == upstream.header("Content-Type")


# --- Range --------------------------------------------------------------------------------


def _expected_range(data: bytes, spec: str) -> tuple[bytes, str]:
    size = len(data)
    if spec == "bytes=10-99":
        return data[10:100], f"bytes 10-99/{size}"
    if spec == "bytes=-20":
        return data[-20:], f"bytes {size - 20}-{size - 1}/{size}"
    if spec == "bytes=100-":
        return data[100:], f"bytes 100-{size - 1}/{size}"
    raise AssertionError(spec)


RANGES = ("bytes=10-99", "bytes=-20", "bytes=100-")


def test_range_requests_on_cached_and_uncached_blobs(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    st = stowage_factory(upstreams=[registry])
    up = registry.client()
    # Four distinct layers: one per uncached range request, plus one for 416.
    layers = [(images.app.repository, d) for d, _ in images.app.layers] + [
        (images.dockerv2.repository, d) for d, _ in images.dockerv2.layers
    ]
    content = {digest: up.get_blob(repo, digest).body for repo, digest in layers}
    since = registry.checkpoint()
    for (repo, digest), spec in zip(layers, RANGES, strict=False):
        data = content[digest]
        want, content_range = _expected_range(data, spec)
        path = _blob_path(registry, repo, digest)
        for state in ("uncached", "cached"):
            resp = _get(st, path, {"Range": spec})
            assert resp.status == 206, (state, spec, resp.body[:200])
            assert resp.header("Content-Range") == content_range, (state, spec)
            assert resp.header("Content-Length") == str(len(want)), (state, spec)
            assert resp.body == want, (state, spec)
            if state == "uncached":
                assert registry.blob_gets(digest, since=since) == 1
                # The partial client still causes a complete, verified fill.
                full = _get(st, path)
                assert full.status == 200
                assert full.body == data
        assert registry.blob_gets(digest, since=since) == 1

    # Unsatisfiable: starts past the end -> 416 with the size, uncached and cached.
    repo, digest = layers[3]
    size = len(content[digest])
    path = _blob_path(registry, repo, digest)
    for state in ("uncached", "cached"):
        resp = _get(st, path, {"Range": f"bytes={size + 10}-"})
        assert resp.status == 416, (state, resp.status, resp.body[:200])
        assert resp.header("Content-Range") == f"bytes */{size}", state
        if state == "uncached":
            assert _get(st, path).body == content[digest]
    assert registry.blob_gets(digest, since=since) == 1


# --- tags, mirror mode, default registry --------------------------------------------------


def test_tags_list_host_prefixed_and_mirror(
    registry: Registry, stowage_factory: StowageFactory
) -> None:
    for tag in ("a", "b", "c"):
        push_image(registry, "pulltest/tags", tag, layer_sizes=[256], seed="pulltest-tags")
    upstream = registry.client().list_tags("pulltest/tags")
    assert sorted(upstream.json()["tags"]) == ["a", "b", "c"]
    st = stowage_factory(upstreams=[registry])

    resp = _get(st, f"/v2/{_prefixed(registry, 'pulltest/tags')}/tags/list")
    assert resp.status == 200
    assert resp.json() == upstream.json()

    resp = _get(st, f"/v2/pulltest/tags/tags/list?ns={registry.host}")
    assert resp.status == 200
    assert resp.json() == upstream.json()
    assert resp.header("OCI-Namespace") == registry.host


def test_mirror_mode_ns_parameter(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    app = images.app
    st = stowage_factory(upstreams=[registry])
    since = registry.checkpoint()
    ns = f"ns={registry.host}"
    resp = _get(st, f"/v2/library/app/manifests/1?{ns}", {"Accept": ACCEPT_ALL_MANIFESTS})
    assert resp.status == 200
    assert resp.body == app.manifest_bytes
    assert resp.header("Docker-Content-Digest") == app.manifest_digest
    assert resp.header("OCI-Namespace") == registry.host
    head = _head(st, f"/v2/library/app/manifests/{app.manifest_digest}?{ns}")
    assert head.status == 200
    assert head.header("OCI-Namespace") == registry.host
    namespaces: dict[tuple[str, str], str | None] = {}
    for digest, _ in app.blobs:
        for state in ("uncached", "cached"):
            blob = _get(st, f"/v2/library/app/blobs/{digest}?{ns}")
            assert blob.status == 200
            assert sha256_digest(blob.body) == digest
            namespaces[(digest[:19], state)] = blob.header("OCI-Namespace")
        assert registry.blob_gets(digest, since=since) == 1
    # Host-prefixed answers carry no OCI-Namespace.
    plain = _get(st, _manifest_path(registry, app, "1"))
    assert plain.status == 200
    assert plain.header("OCI-Namespace") is None
    logged = [r for r in _request_logs(st) if r.get("ns") == registry.host]
    assert len(logged) == 2 + 2 * len(app.blobs)
    # Every blob answer in mirror mode names its namespace, streamed (miss) or not (hit).
    wrong = {k: v for k, v in namespaces.items() if v != registry.host}
    assert not wrong, f"OCI-Namespace missing/wrong: {wrong}"


def test_default_registry_mode(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    app = images.app
    st = stowage_factory(upstreams=[registry], default_registry=registry.host)
    since = registry.checkpoint()
    resp = _get(st, "/v2/library/app/manifests/1", {"Accept": ACCEPT_ALL_MANIFESTS})
    assert resp.status == 200
    assert resp.body == app.manifest_bytes
    assert resp.header("OCI-Namespace") is None
    for digest, _ in app.blobs:
        blob = _get(st, f"/v2/library/app/blobs/{digest}")
        assert blob.status == 200
        assert sha256_digest(blob.body) == digest
    assert registry.count("GET", "/v2/library/app/manifests/1", since=since) == 1
    for digest, _ in app.blobs:
        assert registry.blob_gets(digest, since=since) == 1


# --- containerd ---------------------------------------------------------------------------


def test_containerd_pulls_through_stowage_mirror(
    containerd: Containerd,
    registry: Registry,
    images: SampleImages,
    stowage_factory: StowageFactory,
    tmp_path: Path,
) -> None:
    app, multi = images.app, images.multi
    host_child = multi.child("linux/amd64")
    st = stowage_factory(upstreams=[registry])
    write_hosts_toml(containerd.hosts_dir, registry.host, st.url)

    since = registry.checkpoint()
    for image in (app, multi):
        result = containerd.pull(image.ref, platform="linux/amd64")
        assert result.returncode == 0, result.stderr
        assert containerd.image_digest(image.ref) == image.manifest_digest
    wanted = {d for d, _ in app.blobs} | {d for d, _ in host_child.blobs}
    assert wanted <= containerd.content_digests()

    # stowage served every blob, in mirror (ns) mode, each fetched from upstream once.
    served = {
        r["path"].rsplit("/", 1)[1]
        for r in _request_logs(st)
        if r.get("ns") == registry.host and r["status"] == 200 and "/blobs/" in r["path"]
    }
    assert wanted <= served
    assert st.metric("stowage_requests_total", route="blobs", result="miss") == len(wanted)
    for digest in wanted:
        assert registry.blob_gets(digest, since=since) == 1

    # A fresh containerd pulling the same images is served from stowage's cache.
    since = registry.checkpoint()
    hits_before = st.metric("stowage_requests_total", route="blobs", result="hit")
    with Containerd(tmp_path / "containerd-2", hosts_dir=containerd.hosts_dir) as fresh:
        for image in (app, multi):
            result = fresh.pull(image.ref, platform="linux/amd64")
            assert result.returncode == 0, result.stderr
            assert fresh.image_digest(image.ref) == image.manifest_digest
        assert wanted <= fresh.content_digests()
    _no_upstream_blob_gets(registry, [(d, 0) for d in wanted], since)
    assert registry.count("*", "/manifests/", since=since) == 0
    hits = st.metric("stowage_requests_total", route="blobs", result="hit") - hits_before
    assert hits >= len(wanted)


# --- cache hits and persistence -----------------------------------------------------------


def test_second_pull_is_served_from_cache(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    app = images.app
    st = stowage_factory(upstreams=[registry])
    name = f"{_prefixed(registry, app.repository)}:1"
    _skopeo_from_stowage(st, name, tmp_path / "first")
    from_upstream = st.metric("stowage_bytes_served_total", source="upstream")
    assert from_upstream >= _blob_bytes(app)
    cache_before = st.metric("stowage_bytes_served_total", source="cache")
    hits_before = st.metric("stowage_requests_total", route="blobs", result="hit")
    misses_before = st.metric("stowage_requests_total", route="blobs", result="miss")
    assert misses_before == len(app.blobs)

    since = registry.checkpoint()
    _skopeo_from_stowage(st, name, tmp_path / "second")
    _assert_dir_holds(tmp_path / "second", app)
    _no_upstream_blob_gets(registry, app.blobs, since)
    assert st.metric("stowage_requests_total", route="blobs", result="hit") - hits_before >= len(
        app.blobs
    )
    assert st.metric("stowage_requests_total", route="blobs", result="miss") == misses_before
    assert st.metric("stowage_requests_total", route="manifests", result="hit") >= 1
    grown = st.metric("stowage_bytes_served_total", source="cache") - cache_before
    assert grown >= _blob_bytes(app) + len(app.manifest_bytes)
    assert st.metric("stowage_bytes_served_total", source="upstream") == from_upstream


def test_cache_survives_restart_with_upstream_down(
    registry_factory: RegistryFactory, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    reg = registry_factory("plain")
    image = push_image(reg, "library/persist", "1", layer_sizes=[2048, 4096])
    st = stowage_factory(upstreams=[reg])
    name = _prefixed(reg, image.repository)
    _skopeo_from_stowage(st, f"{name}:1", tmp_path / "before")

    assert st.stop() == 0  # SIGTERM: graceful
    reg.stop()
    st.start()
    assert st.data_dir.exists()

    _skopeo_from_stowage(st, f"{name}:1", tmp_path / "by-tag")
    assert (tmp_path / "by-tag" / "manifest.json").read_bytes() == image.manifest_bytes
    _assert_dir_holds(tmp_path / "by-tag", image)
    _skopeo_from_stowage(st, f"{name}@{image.manifest_digest}", tmp_path / "by-digest")
    assert (tmp_path / "by-digest" / "manifest.json").read_bytes() == image.manifest_bytes
    _pull_raw(st, name, image, image.manifest_digest)
    assert st.metric("stowage_requests_total", route="blobs", result="miss") == 0
    assert st.metric("stowage_upstream_requests_total") == 0
