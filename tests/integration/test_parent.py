"""Two tiers: a node's stowage (the child) with the cluster's stowage as ``--parent``.

Real processes: the test registry, a parent stowage in front of it, and children that
also reach the registry directly (``--insecure-registry``) for when the parent cannot
help. Fake parents (the harness ``fault_server`` with one canned answer, a junk TCP server)
stand in for a parent that is down, broken or lying.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest

from stowage.proxy.errors import API_VERSION
from stowage.upstream.parent import PARENT_BACKOFF, RESULTS
from tests.conftest import FaultFactory, StowageFactory
from tests.integration.test_caching import (
    assert_pulled,
    blob_file,
    client_session,
    get_and_hash,
    index_rows,
    skopeo_pull,
    tmp_files,
    until,
)
from tests.support.images import PushedImage, push_image
from tests.support.regclient import ACCEPT_ALL_MANIFESTS, sha256_digest
from tests.support.registry import Registry
from tests.support.stowage import Stowage
from tests.support.util import Service, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MANIFEST_HEADERS = {"Accept": ACCEPT_ALL_MANIFESTS}
BACKOFF = PARENT_BACKOFF


# --- helpers ------------------------------------------------------------------------------


def child_of(
    stowage_factory: StowageFactory, parent_url: str, registry: Registry, **kwargs: Any
) -> Stowage:
    """A stowage with ``--parent`` that can also reach ``registry`` itself."""
    extra = ["--parent", parent_url, *kwargs.pop("extra_args", ())]
    return stowage_factory(upstreams=[registry], extra_args=extra, **kwargs)


def pull(stowage: Stowage, registry: Registry, image: PushedImage) -> None:
    """GET the manifest by tag and every blob through ``stowage``; all exact."""
    base = f"/v2/{registry.path_prefix}/{image.repository}"
    resp = stowage.get(f"{base}/manifests/{image.tag}", MANIFEST_HEADERS)
    assert resp.status == 200, resp.body
    assert resp.body == image.manifest_bytes
    assert resp.header("Docker-Content-Digest") == image.manifest_digest
    for digest, size in image.blobs:
        resp = stowage.get(f"{base}/blobs/{digest}")
        assert resp.status == 200, resp.body
        assert len(resp.body) == size
        assert sha256_digest(resp.body) == digest


def parent_results(stowage: Stowage) -> dict[str, float]:
    """``stowage_parent_requests_total`` by result."""
    return {r: stowage.metric("stowage_parent_requests_total", result=r) for r in RESULTS}


def auth_file(tmp_path: Path, registry: Registry) -> Path:
    path = tmp_path / "node-auth.json"
    secret = base64.b64encode(b"node-user:node-secret").decode()
    path.write_text(json.dumps({"auths": {registry.host: {"auth": secret}}}))
    return path


class JunkServer(Service):
    """Accepts connections and answers bytes that are not HTTP."""

    def __init__(self) -> None:
        self.port = free_port()
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="JunkServer")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff garbage\r\n\r\n")

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


# --- the parent serves the children -------------------------------------------------------


def test_children_pull_through_the_parent_and_the_registry_sends_each_blob_once(
    registry: Registry, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    image = push_image(registry, "tiers/shared", "1")
    since = registry.checkpoint()
    parent = stowage_factory(upstreams=[registry])
    child_a = child_of(stowage_factory, parent.url, registry)
    child_b = child_of(stowage_factory, parent.url, registry)

    dest = tmp_path / "pulled-a"
    proc = skopeo_pull(f"{child_a.host}/{registry.path_prefix}/{image.repository}:1", dest)
    assert_pulled(proc, dest, image)
    pull(child_b, registry, image)
    for stowage in (parent, child_a, child_b):
        stowage.settle()

    # The registry sent everything once, to the parent; the children never asked it.
    for digest, _ in image.blobs:
        assert registry.blob_gets(digest, since=since) == 1
    assert registry.count("GET", f"/{image.repository}/manifests/", since=since) == 1
    for child in (child_a, child_b):
        assert child.metric("stowage_upstream_requests") == 0
        results = parent_results(child)
        assert results["ok"] >= 1 + len(image.blobs), results
        assert results["fallback"] == results["skipped"] == results["mismatch"] == 0, results
        # Cached by the child, byte for byte what the registry holds.
        for digest, size in image.blobs:
            assert blob_file(child, digest).stat().st_size == size
            assert sha256_digest(blob_file(child, digest).read_bytes()) == digest
        assert image.manifest_digest in index_rows(child, "manifests")

    # The parent saw the children's requests, host-prefixed; the second child's were hits.
    parent_log = parent.log_text()
    for digest, _ in image.blobs:
        assert f"/v2/{registry.path_prefix}/{image.repository}/blobs/{digest}" in parent_log
    assert parent.metric("stowage_requests", route="blobs", result="miss") == len(image.blobs)
    assert parent.metric("stowage_requests", route="blobs", result="hit") >= len(image.blobs)
    assert parent.metric("stowage_requests", route="manifests") >= 2


def test_tag_revalidation_and_tag_list_go_to_the_parent(
    registry: Registry, stowage_factory: StowageFactory
) -> None:
    image = push_image(registry, "tiers/revalidated", "1")
    parent = stowage_factory(upstreams=[registry])
    child = child_of(stowage_factory, parent.url, registry, tag_ttl=0)
    path = f"/v2/{registry.path_prefix}/{image.repository}"

    for _ in range(2):  # the second one revalidates the tag with a HEAD
        resp = child.get(f"{path}/manifests/1", MANIFEST_HEADERS)
        assert resp.status == 200 and resp.body == image.manifest_bytes
    resp = child.get(f"{path}/tags/list")
    assert resp.status == 200 and resp.json()["tags"] == ["1"]

    assert child.metric("stowage_upstream_requests") == 0
    assert parent_results(child)["ok"] == 3
    assert parent.metric("stowage_requests", route="tags") == 1
    head = [e for e in parent.log_events("request") if e["method"] == "HEAD"]
    assert [e["path"] for e in head] == [f"{path}/manifests/1"]


# --- the parent is down -------------------------------------------------------------------


def test_dead_parent_child_pulls_directly_then_uses_the_parent_again_after_backoff(
    registry: Registry, stowage_factory: StowageFactory
) -> None:
    first = push_image(registry, "tiers/outage", "1")
    second = push_image(registry, "tiers/outage", "2")
    parent = stowage_factory(upstreams=[registry])
    child = child_of(stowage_factory, parent.url, registry)
    parent.kill9()
    since = registry.checkpoint()

    failed_at = time.monotonic()
    pull(child, registry, first)  # an empty cache, the whole image, directly
    child.settle()
    for digest, _ in first.blobs:
        assert registry.blob_gets(digest, since=since) == 1
        assert sha256_digest(blob_file(child, digest).read_bytes()) == digest
    results = parent_results(child)
    # Asked once, then left alone for the back-off (the pull takes less than that).
    assert results["fallback"] == 1, results
    assert results["skipped"] == len(first.blobs), results
    assert results["ok"] == 0, results
    failures = child.log_events("parent failed: asking registries directly")
    assert len(failures) == 1, failures
    assert failures[0]["parent"] == parent.url
    assert "unreachable" in failures[0]["reason"]

    parent.start()
    time.sleep(max(0.0, failed_at + BACKOFF + 0.5 - time.monotonic()))
    direct_before = child.metric("stowage_upstream_requests")
    pull(child, registry, second)
    assert child.metric("stowage_upstream_requests") == direct_before
    results = parent_results(child)
    assert results["ok"] == 1 + len(second.blobs), results
    assert results["fallback"] == 1, results
    assert parent.metric("stowage_requests", route="blobs") == len(second.blobs)
    assert child.log_events("parent answers again")


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        pytest.param(500, {}, b"internal error", id="500"),
        pytest.param(200, {"Content-Type": "text/html"}, b"<html>login</html>", id="not-registry"),
        pytest.param(404, {}, b"404 page not found", id="404-not-registry"),
        pytest.param(502, API_VERSION, b'{"errors":[]}', id="502-registry"),
        pytest.param(429, {**API_VERSION, "Retry-After": "60"}, b"", id="429"),
    ],
)
def test_failing_parent_falls_back_to_the_registry(
    registry: Registry,
    stowage_factory: StowageFactory,
    fault_server: FaultFactory,
    status: int,
    headers: dict[str, str],
    body: bytes,
) -> None:
    image = push_image(registry, "tiers/failing", "1")
    fault = fault_server(status=status, headers=headers, body=body)
    child = child_of(stowage_factory, fault.url, registry)
    since = registry.checkpoint()

    pull(child, registry, image)
    child.settle()
    for digest, _ in image.blobs:
        assert registry.blob_gets(digest, since=since) == 1
    # Not asked on every request: once, then backed off.
    assert fault.request_count == 1
    assert fault.requests[0].path_qs == (
        f"/v2/{registry.path_prefix}/{image.repository}/manifests/1"
    )
    results = parent_results(child)
    assert (results["fallback"], results["skipped"], results["ok"]) == (1, len(image.blobs), 0)
    (failure,) = child.log_events("parent failed: asking registries directly")
    assert failure["parent"] == fault.url
    assert str(status) in failure["reason"]
    # A registry's answer (5xx, 429) backs off the parent for that registry only; anything
    # that is no registry's answer, for every registry.
    scoped = API_VERSION.keys() <= headers.keys()
    assert failure["registry"] == (registry.host if scoped else "*"), failure


def test_parent_answering_junk_falls_back_to_the_registry(
    registry: Registry, stowage_factory: StowageFactory
) -> None:
    image = push_image(registry, "tiers/junk", "1")
    with JunkServer() as junk:
        child = child_of(stowage_factory, junk.url, registry)
        pull(child, registry, image)
        assert junk.connections == 1
    results = parent_results(child)
    assert (results["fallback"], results["skipped"]) == (1, len(image.blobs))


# --- the parent lies ----------------------------------------------------------------------


async def test_parent_sending_wrong_blob_bytes_is_never_cached(
    registry: Registry, stowage_factory: StowageFactory, fault_server: FaultFactory
) -> None:
    image = await asyncio.to_thread(
        push_image, registry, "tiers/lying-blob", "1", layer_sizes=(256 * 1024,)
    )
    digest, size = image.layers[0]
    good = (await asyncio.to_thread(registry.client().get_blob, image.repository, digest)).body
    wrong = bytearray(good)
    wrong[size // 2] ^= 0xFF
    parent = fault_server(
        status=200,
        headers={**API_VERSION, "Docker-Content-Digest": digest},
        body=bytes(wrong),
    )
    child = await asyncio.to_thread(child_of, stowage_factory, parent.url, registry)
    since = await asyncio.to_thread(registry.checkpoint)
    url = f"{child.url}/v2/{registry.path_prefix}/{image.repository}/blobs/{digest}"

    async with client_session() as session:
        # Decided: the client gets a retryable error (cut before the last byte) ...
        with pytest.raises(aiohttp.ClientPayloadError):
            await get_and_hash(session, url)
        await until(lambda: child.metric("stowage_fills_in_flight") == 0, 5, "the fill to end")
        assert not blob_file(child, digest).exists()
        assert tmp_files(child) == []
        assert digest not in index_rows(child, "blobs")
        assert await asyncio.to_thread(child.metric, "stowage_digest_mismatches") == 1
        results = await asyncio.to_thread(parent_results, child)
        assert (results["ok"], results["mismatch"]) == (1, 1), results

        # ... and its retry the right bytes, from the registry (the parent is backed off).
        assert await get_and_hash(session, url) == (200, digest, size)
        await until(lambda: blob_file(child, digest).exists(), 5, "the fill to be committed")
    assert blob_file(child, digest).read_bytes() == good
    assert parent.count("*", f"/blobs/{digest}") == 1
    assert await asyncio.to_thread(registry.blob_gets, digest, since=since) == 1
    failures = await asyncio.to_thread(
        child.log_events, "parent failed: asking registries directly"
    )
    assert len(failures) == 1 and digest in failures[0]["reason"], failures


def test_parent_sending_a_wrong_manifest_falls_back_at_once(
    registry: Registry, stowage_factory: StowageFactory, fault_server: FaultFactory
) -> None:
    image = push_image(registry, "tiers/lying-manifest", "1")
    evil = image.manifest_bytes.replace(b'"schemaVersion"', b'"schemaVersion" ', 1)
    assert evil != image.manifest_bytes
    parent = fault_server(
        status=200,
        headers={
            **API_VERSION,
            "Content-Type": image.media_type,
            "Docker-Content-Digest": sha256_digest(evil),
        },
        body=evil,
    )
    child = child_of(stowage_factory, parent.url, registry)
    since = registry.checkpoint()

    path = f"/v2/{registry.path_prefix}/{image.repository}/manifests/{image.manifest_digest}"
    resp = child.get(path, MANIFEST_HEADERS)
    assert resp.status == 200, resp.body
    assert resp.body == image.manifest_bytes
    assert resp.header("Docker-Content-Digest") == image.manifest_digest
    assert child.metric("stowage_digest_mismatches") == 1
    assert parent_results(child)["mismatch"] == 1
    assert parent.count("*", "/manifests/") == 1
    assert registry.count("GET", f"/manifests/{image.manifest_digest}", since=since) == 1
    assert blob_file(child, image.manifest_digest).read_bytes() == image.manifest_bytes


# --- what the parent refuses, and whose credentials it gets -------------------------------


@pytest.mark.parametrize("with_credentials", [False, True], ids=["anonymous", "credentials"])
def test_parent_refusing_falls_back_with_own_credentials_never_sent_to_the_parent(
    registry: Registry,
    stowage_factory: StowageFactory,
    fault_server: FaultFactory,
    tmp_path: Path,
    with_credentials: bool,
) -> None:
    image = push_image(registry, "tiers/refused", "1")
    parent = fault_server(
        status=401,
        headers={**API_VERSION, "WWW-Authenticate": 'Basic realm="stowage"'},
        body=b'{"errors":[{"code":"UNAUTHORIZED","message":"private"}]}',
    )
    kwargs: dict[str, Any] = {}
    if with_credentials:
        kwargs["auth_file"] = auth_file(tmp_path, registry)
    child = child_of(stowage_factory, parent.url, registry, **kwargs)

    pull(child, registry, image)
    # A refusal is no failure: every request still goes to the parent first.
    assert parent.count("*", f"/{image.repository}/") == 1 + len(image.blobs)
    results = parent_results(child)
    assert (results["private"], results["fallback"], results["skipped"]) == (
        1 + len(image.blobs),
        0,
        0,
    )
    assert all("Authorization" not in r.headers for r in parent.requests)


@pytest.mark.parametrize("with_credentials", [False, True], ids=["anonymous", "credentials"])
def test_parent_404_is_final_only_without_credentials(
    registry: Registry,
    stowage_factory: StowageFactory,
    fault_server: FaultFactory,
    tmp_path: Path,
    with_credentials: bool,
) -> None:
    image = push_image(registry, "tiers/hidden", "1")
    parent = fault_server(
        status=404,
        headers=dict(API_VERSION),
        body=b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not found upstream"}]}',
    )
    kwargs: dict[str, Any] = {}
    if with_credentials:
        kwargs["auth_file"] = auth_file(tmp_path, registry)
    child = child_of(stowage_factory, parent.url, registry, **kwargs)
    since = registry.checkpoint()

    resp = child.get(f"/v2/{registry.path_prefix}/{image.repository}/manifests/1", MANIFEST_HEADERS)
    if with_credentials:
        # The registry may hide a private repository from anonymous clients behind a 404.
        assert resp.status == 200 and resp.body == image.manifest_bytes
        assert registry.count("GET", f"/{image.repository}/manifests/1", since=since) == 1
        assert parent_results(child)["private"] == 1
    else:
        # The parent answers 404 only when the registry did, to the request we would send.
        assert resp.status == 404, resp.body
        assert registry.count("*", f"/{image.repository}/manifests/", since=since) == 0
        assert parent_results(child)["ok"] == 1
    assert all("Authorization" not in r.headers for r in parent.requests)


def test_parent_option_in_serve_help() -> None:
    from tests.support.stowage import run_cli

    proc = run_cli("serve", "--help")
    assert proc.returncode == 0
    flat = " ".join(proc.stdout.split())
    assert "--parent URL" in flat and "STOWAGE_PARENT" in flat


def test_parent_url_is_checked_at_start_up(tmp_path: Path) -> None:
    from tests.support.stowage import run_cli

    proc = run_cli("serve", "--data", str(tmp_path), "--parent", "parent:7439")
    assert proc.returncode != 0
    # The validator's own words (the serving log line would name the parent too).
    assert "--parent 'parent:7439' must start with http:// or https://" in proc.stderr, proc.stderr
