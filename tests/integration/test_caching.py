"""Caching behaviour with real processes: tag TTL and revalidation, serving through upstream
outages, single-flight fills, streaming while filling, digest verification and crash safety.

Upstreams are either the real Distribution registry (``registry``/``registry_factory``), the
harness ``fault_server``, or ``FakeUpstream`` below: a tiny aiohttp registry written for these
tests that can serve a blob slowly, serve wrong bytes for a digest, or cut a blob halfway, and
records when it sent what (same process and clock as the test clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import FaultFactory, RegistryFactory, SampleImages, StowageFactory
from tests.support.appthread import ThreadedApp
from tests.support.images import PushedImage, push_image
from tests.support.regclient import ACCEPT_ALL_MANIFESTS, OCI_MANIFEST, sha256_digest
from tests.support.registry import Registry
from tests.support.stowage import Stowage
from tests.support.util import Service, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MiB = 1024 * 1024
MANIFEST_HEADERS = {"Accept": ACCEPT_ALL_MANIFESTS}


# --- a scriptable upstream registry -----------------------------------------------------------


@dataclass
class FakeBlob:
    """How ``FakeUpstream`` answers GET /v2/<repo>/blobs/<digest>."""

    data: bytes  # the bytes actually sent (may differ from what the digest names)
    chunk: int = 64 * 1024
    delay: float = 0.0  # seconds slept after each chunk
    cut_after: int | None = None  # abort the connection once this many bytes were sent


@dataclass
class FakeManifest:
    body: bytes
    content_type: str = OCI_MANIFEST
    digest_header: str | None = None  # Docker-Content-Digest; default: the body's digest
    delay: float = 0.0


@dataclass
class Transfer:
    """One request the fake upstream answered (times are ``time.monotonic()``)."""

    method: str
    path: str
    started: float
    first_byte: float | None = None
    finished: float | None = None  # when the last chunk was handed to the socket
    sent: int = 0
    aborted: bool = False


class FakeUpstream(Service):
    """A minimal plain-HTTP OCI registry on its own thread and event loop (so it keeps serving
    while a test blocks or runs its own loop)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.blobs: dict[str, FakeBlob] = {}
        self.manifests: dict[str, FakeManifest] = {}  # key: "<repo>:<tag>" or "<repo>@<digest>"
        self._lock = threading.Lock()
        self._transfers: list[Transfer] = []
        self._app = ThreadedApp(
            [("*", "/{tail:.*}", self._handle)], name=f"FakeUpstream:{self.port}", port=self.port
        )

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def prefix(self) -> str:
        return f"127.0.0.1-{self.port}"

    # -- content ---------------------------------------------------------------------------

    def set_blob(self, digest: str, blob: FakeBlob) -> None:
        self.blobs[digest] = blob

    def set_manifest(self, repository: str, reference: str, manifest: FakeManifest) -> None:
        sep = "@" if reference.startswith("sha256:") else ":"
        self.manifests[f"{repository}{sep}{reference}"] = manifest

    # -- observation -----------------------------------------------------------------------

    @property
    def transfers(self) -> list[Transfer]:
        with self._lock:
            return list(self._transfers)

    def count(self, method: str, path_contains: str) -> int:
        return sum(1 for t in self.transfers if t.method == method and path_contains in t.path)

    # -- serving ---------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transfer = Transfer(request.method, request.path, time.monotonic())
        with self._lock:
            self._transfers.append(transfer)
        path = request.path
        if path in ("/v2", "/v2/"):
            return web.json_response({})
        name, sep, ref = path.removeprefix("/v2/").rpartition("/blobs/")
        if sep and ref in self.blobs:
            return await self._blob(request, transfer, ref, self.blobs[ref])
        name, sep, ref = path.removeprefix("/v2/").rpartition("/manifests/")
        key = f"{name}{'@' if ref.startswith('sha256:') else ':'}{ref}"
        if sep and key in self.manifests:
            m = self.manifests[key]
            if m.delay:
                await asyncio.sleep(m.delay)
            transfer.finished = time.monotonic()
            return web.Response(
                body=None if request.method == "HEAD" else m.body,
                headers={
                    "Content-Type": m.content_type,
                    "Docker-Content-Digest": m.digest_header or sha256_digest(m.body),
                    "Content-Length": str(len(m.body)),
                },
            )
        body = {"errors": [{"code": "NOT_FOUND", "message": f"{path} not found"}]}
        return web.json_response(body, status=404)

    async def _blob(
        self, request: web.Request, transfer: Transfer, digest: str, blob: FakeBlob
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        )
        resp.content_length = len(blob.data)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        try:
            for offset in range(0, len(blob.data), blob.chunk):
                piece = blob.data[offset : offset + blob.chunk]
                if blob.cut_after is not None and offset + len(piece) >= blob.cut_after:
                    piece = piece[: blob.cut_after - offset]
                    await resp.write(piece)
                    transfer.sent += len(piece)
                    await asyncio.sleep(0.05)  # let the bytes leave before the cut
                    transfer.aborted = True
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                last = offset + len(piece) >= len(blob.data)
                if last:
                    # Stamped before the write: nobody can have the last byte earlier.
                    transfer.finished = time.monotonic()
                await resp.write(piece)
                if transfer.first_byte is None:
                    transfer.first_byte = time.monotonic()
                transfer.sent += len(piece)
                if blob.delay and not last:
                    await asyncio.sleep(blob.delay)
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            transfer.aborted = True
        return resp

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        self._app.start()
        return self

    def stop(self) -> None:
        self._app.stop()


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def random_blob(size: int, seed: str) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, sha256_digest(data)


# --- helpers ----------------------------------------------------------------------------------


def manifest_url(stowage: Stowage, prefix: str, repository: str, ref: str) -> str:
    return f"{stowage.url}/v2/{prefix}/{repository}/manifests/{ref}"


def blob_url(stowage: Stowage, prefix: str, repository: str, digest: str) -> str:
    return f"{stowage.url}/v2/{prefix}/{repository}/blobs/{digest}"


def blob_file(stowage: Stowage, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return stowage.data_dir / "blobs" / "sha256" / hex_[:2] / hex_


def tmp_files(stowage: Stowage) -> list[Path]:
    tmp = stowage.data_dir / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def files_under_blobs(stowage: Stowage) -> dict[str, int]:
    """{digest: size} of every file under blobs/."""
    root = stowage.data_dir / "blobs"
    return {
        f"{p.parent.parent.name}:{p.name}": p.stat().st_size for p in root.rglob("*") if p.is_file()
    }


def index_rows(stowage: Stowage, table: str) -> dict[str, int]:
    """{digest: size} of the index's ``blobs`` or ``manifests`` table (read-only)."""
    db = stowage.data_dir / "index.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(con.execute(f"SELECT digest, size FROM {table}").fetchall())
    finally:
        con.close()


def oci_error(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert isinstance(doc.get("errors"), list) and doc["errors"], doc
    error: dict[str, Any] = doc["errors"][0]
    return error


def requests_metric(stowage: Stowage, route: str, result: str) -> float:
    return stowage.metric("stowage_requests", route=route, result=result)


def skopeo_pull(ref: str, dest: Path) -> subprocess.CompletedProcess[str]:
    """``skopeo copy docker://REF oci:DEST:pulled`` from plain-HTTP stowage (not raising)."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo not installed")
    with tempfile.TemporaryDirectory(prefix="skopeo-") as tmp:
        auth, conf = Path(tmp) / "auth.json", Path(tmp) / "registries.conf"
        auth.write_text("{}")
        conf.write_text("")
        argv = [
            skopeo,
            "--insecure-policy",
            "--registries-conf",
            str(conf),
            "copy",
            "--src-tls-verify=false",
            "--src-authfile",
            str(auth),
            f"docker://{ref}",
            f"oci:{dest}:pulled",
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def assert_pulled(proc: subprocess.CompletedProcess[str], dest: Path, image: PushedImage) -> None:
    """skopeo succeeded and the OCI layout holds the exact manifest and verified blobs."""
    assert proc.returncode == 0, f"skopeo failed:\n{proc.stdout}{proc.stderr}"
    index = json.loads((dest / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.manifest_digest]
    for digest, size in [(image.manifest_digest, len(image.manifest_bytes)), *image.blobs]:
        data = (dest / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert len(data) == size
        assert sha256_digest(data) == digest


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60),
        auto_decompress=False,
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
    )


async def get_and_hash(session: aiohttp.ClientSession, url: str) -> tuple[int, str, int]:
    """(status, sha256 digest of the body, body length), streamed."""
    async with session.get(url) as resp:
        hasher = hashlib.sha256()
        length = 0
        async for chunk in resp.content.iter_any():
            hasher.update(chunk)
            length += len(chunk)
        return resp.status, "sha256:" + hasher.hexdigest(), length


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll a (blocking) check from async code until it holds, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.02)


# --- tag TTL ----------------------------------------------------------------------------------


def test_tag_within_ttl_makes_no_upstream_request(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    stowage = stowage_factory(upstreams=[registry], tag_ttl=30)
    path = f"/v2/{registry.path_prefix}/library/app/manifests/1"

    first = stowage.get(path, MANIFEST_HEADERS)
    assert first.status == 200
    assert first.body == images.app.manifest_bytes
    since = registry.checkpoint()
    hits = requests_metric(stowage, "manifests", "hit")

    second = stowage.get(path, MANIFEST_HEADERS)
    assert second.status == 200
    assert second.body == images.app.manifest_bytes
    assert second.header("Docker-Content-Digest") == images.app.manifest_digest
    assert registry.requests()[since:] == []  # not even a HEAD
    assert requests_metric(stowage, "manifests", "hit") == hits + 1


def test_tag_after_ttl_is_revalidated_with_one_head(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    stowage = stowage_factory(upstreams=[registry], tag_ttl=1)
    path = f"/v2/{registry.path_prefix}/library/app/manifests/1"
    assert stowage.get(path, MANIFEST_HEADERS).status == 200
    time.sleep(1.2)
    since = registry.checkpoint()

    resp = stowage.get(path, MANIFEST_HEADERS)
    assert resp.status == 200
    assert resp.body == images.app.manifest_bytes
    assert registry.count("HEAD", "/library/app/manifests/1", since=since) == 1
    assert registry.count("GET", "/manifests/", since=since) == 0
    assert len(registry.requests()[since:]) == 1

    # The HEAD renewed the TTL: an immediate repeat asks nothing.
    since = registry.checkpoint()
    assert stowage.get(path, MANIFEST_HEADERS).status == 200
    assert registry.requests()[since:] == []


def test_tag_moved_upstream_is_served_after_ttl(
    registry_factory: RegistryFactory, stowage_factory: StowageFactory
) -> None:
    reg = registry_factory()
    old = push_image(reg, "library/moving", "1", seed="moving-old")
    stowage = stowage_factory(upstreams=[reg], tag_ttl=1)
    path = f"/v2/{reg.path_prefix}/library/moving/manifests/1"
    resp = stowage.get(path, MANIFEST_HEADERS)
    assert resp.header("Docker-Content-Digest") == old.manifest_digest

    new = push_image(reg, "library/moving", "1", seed="moving-new")
    assert new.manifest_digest != old.manifest_digest
    time.sleep(1.2)
    since = reg.checkpoint()
    resp = stowage.get(path, MANIFEST_HEADERS)
    assert resp.status == 200
    assert resp.header("Docker-Content-Digest") == new.manifest_digest
    assert resp.body == new.manifest_bytes
    assert reg.count("HEAD", "/library/moving/manifests/1", since=since) == 1
    assert reg.count("GET", "/library/moving/manifests/1", since=since) == 1
    assert len(reg.requests()[since:]) == 2

    # The old manifest stays addressable by digest, from the cache.
    since = reg.checkpoint()
    by_digest = stowage.get(
        f"/v2/{reg.path_prefix}/library/moving/manifests/{old.manifest_digest}", MANIFEST_HEADERS
    )
    assert by_digest.body == old.manifest_bytes
    assert reg.requests()[since:] == []


# --- outages ----------------------------------------------------------------------------------

OUTAGES = ["stopped", "500", "429", "deleted"]


@pytest.mark.parametrize("outage", OUTAGES)
def test_cached_image_is_served_through_upstream_outage(
    outage: str,
    registry_factory: RegistryFactory,
    stowage_factory: StowageFactory,
    fault_server: FaultFactory,
    tmp_path: Path,
) -> None:
    reg = registry_factory()
    image = push_image(reg, "library/outage", "1", seed=f"outage-{outage}")
    stowage = stowage_factory(upstreams=[reg], tag_ttl=1)
    name = f"{stowage.host}/{reg.path_prefix}/library/outage"
    assert_pulled(skopeo_pull(f"{name}:1", tmp_path / "warm"), tmp_path / "warm", image)

    fault = None
    if outage == "deleted":
        assert reg.client().delete_manifest("library/outage", image.manifest_digest).status == 202
        assert reg.client().get_manifest("library/outage", "1").status == 404
    else:
        reg.stop()
        if outage == "500":
            fault = fault_server(port=reg.port, status=500, body="internal error")
        elif outage == "429":
            fault = fault_server(port=reg.port, status=429, headers={"Retry-After": "30"})
    since = reg.checkpoint()
    time.sleep(1.2)  # past the tag TTL: stowage must ask upstream, and fail
    stale = requests_metric(stowage, "manifests", "stale")

    dest = tmp_path / "by-tag"
    assert_pulled(skopeo_pull(f"{name}:1", dest), dest, image)
    assert requests_metric(stowage, "manifests", "stale") >= stale + 1
    dest = tmp_path / "by-digest"
    assert_pulled(skopeo_pull(f"{name}@{image.manifest_digest}", dest), dest, image)

    # Upstream was asked about the tag (and failed); content by digest never needed it.
    if fault is not None:
        assert fault.count("*", "/library/outage/manifests/1") >= 1
        assert fault.count("*", "/manifests/sha256:") == 0
        assert fault.count("*", "/blobs/") == 0
    elif outage == "deleted":
        assert reg.count("HEAD", "/library/outage/manifests/1", since=since) >= 1
        assert reg.count("*", "/manifests/sha256:", since=since) == 0
        assert reg.count("*", "/blobs/", since=since) == 0
    # Raw check of the same: the tag answers with the cached manifest.
    resp = stowage.get(f"/v2/{reg.path_prefix}/library/outage/manifests/1", MANIFEST_HEADERS)
    assert resp.status == 200
    assert resp.body == image.manifest_bytes
    assert resp.header("Docker-Content-Digest") == image.manifest_digest


def test_nothing_cached_and_upstream_down_is_502_naming_upstream(
    stowage_factory: StowageFactory,
) -> None:
    port = free_port()  # nothing listens here
    upstream = f"127.0.0.1:{port}"
    stowage = stowage_factory(insecure_registries=[upstream])
    prefix = f"127.0.0.1-{port}"
    digest = "sha256:" + "ab" * 32
    for path in (
        f"/v2/{prefix}/library/gone/manifests/1",
        f"/v2/{prefix}/library/gone/manifests/{digest}",
        f"/v2/{prefix}/library/gone/blobs/{digest}",
    ):
        resp = stowage.get(path, MANIFEST_HEADERS)
        assert resp.status == 502, (path, resp.status, resp.body)
        error = oci_error(resp.body)
        assert upstream in error["message"], (path, error)
    assert requests_metric(stowage, "manifests", "error") == 2
    assert requests_metric(stowage, "blobs", "error") == 1


def test_nothing_cached_and_upstream_429_is_429_with_retry_after(
    stowage_factory: StowageFactory, fault_server: FaultFactory
) -> None:
    fault = fault_server(status=429, headers={"Retry-After": "7"})
    stowage = stowage_factory(insecure_registries=[f"127.0.0.1:{fault.port}"])
    prefix = f"127.0.0.1-{fault.port}"
    digest = "sha256:" + "cd" * 32
    for path in (
        f"/v2/{prefix}/library/limited/manifests/1",
        f"/v2/{prefix}/library/limited/blobs/{digest}",
    ):
        resp = stowage.get(path, MANIFEST_HEADERS)
        assert resp.status == 429, (path, resp.status, resp.body)
        # Upstream's delay is passed on (or what is left of it, if stowage holds back).
        retry_after = resp.header("Retry-After") or ""
        assert retry_after.isdigit() and 1 <= int(retry_after) <= 7, retry_after
        assert oci_error(resp.body)["code"] == "TOOMANYREQUESTS"
        assert "127.0.0.1" in oci_error(resp.body)["message"]
    assert fault.count("GET", "/library/limited/manifests/1") == 1
    # No retry storm: at most one blob request within the Retry-After window.
    assert fault.count("GET", f"/library/limited/blobs/{digest}") <= 1


# --- single flight ----------------------------------------------------------------------------


async def test_twenty_clients_of_one_uncached_blob_make_one_upstream_get(
    registry_factory: RegistryFactory, stowage_factory: StowageFactory
) -> None:
    reg = registry_factory()
    image = await asyncio.to_thread(
        push_image, reg, "library/big", "1", layer_sizes=(8 * MiB,), seed="caching-big"
    )
    digest, size = image.layers[0]
    assert size > 7 * MiB
    stowage = stowage_factory(upstreams=[reg])
    since = await asyncio.to_thread(reg.checkpoint)
    url = blob_url(stowage, reg.path_prefix, "library/big", digest)

    async with client_session() as session:
        results = await asyncio.gather(*(get_and_hash(session, url) for _ in range(20)))

    assert results == [(200, digest, size)] * 20
    assert await asyncio.to_thread(reg.blob_gets, digest, since=since) == 1
    # The clients really overlapped (misses joined the fill rather than hitting the cache).
    assert await asyncio.to_thread(requests_metric, stowage, "blobs", "miss") >= 2
    await until(lambda: blob_file(stowage, digest).exists(), 5, "the fill to be committed")
    assert blob_file(stowage, digest).stat().st_size == size


async def test_concurrent_clients_of_one_uncached_tag_make_one_upstream_get(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + "11" * 32,
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    # Slow answer: every client arrives while the first fetch is still running.
    fake_upstream.set_manifest("library/tagged", "1", FakeManifest(body, delay=0.5))
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    url = manifest_url(stowage, fake_upstream.prefix, "library/tagged", "1")

    async def get() -> tuple[int, bytes]:
        async with session.get(url, headers=MANIFEST_HEADERS) as resp:
            return resp.status, await resp.read()

    async with client_session() as session:
        results = await asyncio.gather(*(get() for _ in range(20)))
    assert results == [(200, body)] * 20
    assert fake_upstream.count("GET", "/library/tagged/manifests/1") == 1
    assert fake_upstream.count("HEAD", "/manifests/") == 0


# --- streaming while filling ------------------------------------------------------------------


def slow_blob(fake: FakeUpstream, size: int, seconds: float, seed: str) -> tuple[bytes, str]:
    data, digest = random_blob(size, seed)
    chunk = 64 * 1024
    fake.set_blob(digest, FakeBlob(data, chunk=chunk, delay=seconds / (size // chunk)))
    return data, digest


async def test_first_client_streams_before_the_fill_completes(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    size = 4 * MiB
    _, digest = slow_blob(fake_upstream, size, 2.0, "stream-first")
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    url = blob_url(stowage, fake_upstream.prefix, "library/slow", digest)
    assert await asyncio.to_thread(stowage.metric, "stowage_fills_in_flight") == 0

    async with client_session() as session, session.get(url) as resp:
        assert resp.status == 200
        assert resp.content_length == size
        hasher = hashlib.sha256()
        first = await resp.content.readany()
        first_at = time.monotonic()
        assert first
        hasher.update(first)
        # Mid-fill: the gauge shows it, and the blob is not in the cache yet.
        assert await asyncio.to_thread(stowage.metric, "stowage_fills_in_flight") == 1
        assert not blob_file(stowage, digest).exists()
        async for chunk in resp.content.iter_any():
            hasher.update(chunk)
        assert "sha256:" + hasher.hexdigest() == digest

    [transfer] = fake_upstream.transfers
    assert transfer.finished is not None
    # The upstream took ~2 s; the client had bytes long before it was done.
    assert first_at < transfer.finished - 1.0, (first_at, transfer.finished)
    await until(
        lambda: stowage.metric("stowage_fills_in_flight") == 0, 5, "fills_in_flight back to 0"
    )
    assert blob_file(stowage, digest).stat().st_size == size
    assert await asyncio.to_thread(stowage.metric, "stowage_cache_size_bytes") == size
    assert index_rows(stowage, "blobs") == {digest: size}


async def test_client_disconnecting_does_not_abort_the_fill(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    size = 4 * MiB
    _, digest = slow_blob(fake_upstream, size, 1.5, "stream-disconnect")
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    url = blob_url(stowage, fake_upstream.prefix, "library/slow", digest)

    async with client_session() as session:
        resp = await session.get(url)
        assert resp.status == 200
        assert await resp.content.readany()
        resp.close()  # drops the connection mid-body
        dropped_at = time.monotonic()

        await until(lambda: blob_file(stowage, digest).exists(), 10, "the fill to complete")
        [transfer] = fake_upstream.transfers
        await until(lambda: transfer.sent == size, 5, "the upstream to count its last chunk")
        assert not transfer.aborted
        # The upstream kept sending well after the client went away.
        assert transfer.finished is not None and transfer.finished > dropped_at + 0.5

        hits = await asyncio.to_thread(requests_metric, stowage, "blobs", "hit")
        assert await get_and_hash(session, url) == (200, digest, size)
        assert await asyncio.to_thread(requests_metric, stowage, "blobs", "hit") == hits + 1
    assert fake_upstream.count("GET", f"/blobs/{digest}") == 1
    assert tmp_files(stowage) == []


async def test_clients_joining_a_fill_share_it(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    size = 4 * MiB
    _, digest = slow_blob(fake_upstream, size, 2.0, "stream-join")
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    url = blob_url(stowage, fake_upstream.prefix, "library/slow", digest)

    async def staggered(i: int) -> tuple[int, str, int]:
        await asyncio.sleep(0.25 * i)
        return await get_and_hash(session, url)

    async with client_session() as session:
        results = await asyncio.gather(*(staggered(i) for i in range(5)))
    assert results == [(200, digest, size)] * 5
    assert fake_upstream.count("GET", f"/blobs/{digest}") == 1
    # All five arrived while the single fill was running.
    assert await asyncio.to_thread(requests_metric, stowage, "blobs", "miss") == 5


async def test_slow_reader_does_not_delay_another_client(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    size = 16 * MiB  # well beyond what socket buffers absorb for the stalled reader
    _, digest = slow_blob(fake_upstream, size, 2.0, "stream-slow-reader")
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    url = blob_url(stowage, fake_upstream.prefix, "library/slow", digest)

    async with client_session() as session:
        slow = await session.get(url)
        assert slow.status == 200
        hasher = hashlib.sha256()
        hasher.update(await slow.content.readany())  # one chunk, then stall

        # Bounded: were the fill paced by the stalled client, this would never finish.
        fast = await asyncio.wait_for(get_and_hash(session, url), 15)
        fast_done = time.monotonic()
        assert fast == (200, digest, size)
        [transfer] = [t for t in fake_upstream.transfers if t.method == "GET"]
        assert transfer.finished is not None
        # The fast client finished with the upstream, not held back by the stalled one.
        assert fast_done < transfer.finished + 1.0, (fast_done, transfer.finished)
        await until(lambda: blob_file(stowage, digest).exists(), 5, "the fill to be committed")

        # The stalled client still gets the whole, correct blob when it resumes.
        async for chunk in slow.content.iter_any():
            hasher.update(chunk)
        slow.close()
    assert "sha256:" + hasher.hexdigest() == digest
    assert fake_upstream.count("GET", f"/blobs/{digest}") == 1


# --- verification and broken upstreams --------------------------------------------------------


async def test_blob_digest_mismatch_is_rejected_and_not_stored(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    size = 256 * 1024
    good, digest = random_blob(size, "mismatch-blob")
    wrong = bytearray(good)
    wrong[size // 2] ^= 0xFF
    fake_upstream.set_blob(digest, FakeBlob(bytes(wrong)))
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    url = blob_url(stowage, fake_upstream.prefix, "library/bad", digest)
    before = await asyncio.to_thread(stowage.metric, "stowage_digest_mismatches")

    async with client_session() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            await get_and_hash(session, url)
        await until(lambda: stowage.metric("stowage_fills_in_flight") == 0, 5, "the fill to end")
        assert not blob_file(stowage, digest).exists()
        assert tmp_files(stowage) == []
        assert digest not in index_rows(stowage, "blobs")

        # Not negatively cached: the next request asks upstream again (now behaving).
        fake_upstream.set_blob(digest, FakeBlob(good))
        assert await get_and_hash(session, url) == (200, digest, size)
        # Clients get the verified last byte before the fsync; the commit follows.
        await until(lambda: blob_file(stowage, digest).exists(), 5, "the fill to be committed")
    assert fake_upstream.count("GET", f"/blobs/{digest}") == 2
    assert blob_file(stowage, digest).read_bytes() == good
    assert await asyncio.to_thread(stowage.metric, "stowage_digest_mismatches") == before + 1


def test_manifest_digest_mismatch_is_502_and_not_stored(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    good = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + "22" * 32,
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    digest = sha256_digest(good)
    evil = good.replace(b"22222222", b"33333333")
    fake_upstream.set_manifest(
        "library/bad", digest, FakeManifest(evil, digest_header=sha256_digest(evil))
    )
    # A tag whose Docker-Content-Digest does not match the body it comes with.
    fake_upstream.set_manifest("library/bad", "1", FakeManifest(evil, digest_header=digest))
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    path = f"/v2/{fake_upstream.prefix}/library/bad/manifests/{digest}"
    before = stowage.metric("stowage_digest_mismatches")

    resp = stowage.get(path, MANIFEST_HEADERS)
    assert resp.status == 502, resp.body
    assert oci_error(resp.body)["code"] == "DIGEST_INVALID"
    resp = stowage.get(f"/v2/{fake_upstream.prefix}/library/bad/manifests/1", MANIFEST_HEADERS)
    assert resp.status == 502, resp.body
    assert stowage.metric("stowage_digest_mismatches") == before + 2
    assert files_under_blobs(stowage) == {}
    assert tmp_files(stowage) == []
    assert index_rows(stowage, "manifests") == {}

    # The next request tries upstream again, and now gets (and caches) the right bytes.
    fake_upstream.set_manifest("library/bad", digest, FakeManifest(good))
    resp = stowage.get(path, MANIFEST_HEADERS)
    assert resp.status == 200
    assert resp.body == good
    assert fake_upstream.count("GET", f"/library/bad/manifests/{digest}") == 2
    assert files_under_blobs(stowage) == {digest: len(good)}


async def test_upstream_cut_mid_blob_stores_nothing_and_next_request_fills(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    size = 2 * MiB
    data, digest = random_blob(size, "cut-mid-blob")
    fake_upstream.set_blob(digest, FakeBlob(data, cut_after=size // 2))
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    url = blob_url(stowage, fake_upstream.prefix, "library/cut", digest)

    async with client_session() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            await get_and_hash(session, url)
        await until(lambda: stowage.metric("stowage_fills_in_flight") == 0, 5, "the fill to end")
        assert not blob_file(stowage, digest).exists()
        assert tmp_files(stowage) == []
        assert digest not in index_rows(stowage, "blobs")

        fake_upstream.set_blob(digest, FakeBlob(data))
        assert await get_and_hash(session, url) == (200, digest, size)
    assert fake_upstream.count("GET", f"/blobs/{digest}") == 2
    await until(lambda: blob_file(stowage, digest).exists(), 5, "the fill to be committed")
    assert blob_file(stowage, digest).stat().st_size == size


# --- crash safety -----------------------------------------------------------------------------


async def test_kill9_mid_fill_leaves_no_partial_blob(
    fake_upstream: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    size = 8 * MiB
    data, digest = slow_blob(fake_upstream, size, 4.0, "kill-mid-fill")
    stowage = stowage_factory(insecure_registries=[fake_upstream.host])
    url = blob_url(stowage, fake_upstream.prefix, "library/crash", digest)

    async with client_session() as session:
        resp = await session.get(url)
        assert resp.status == 200
        received = 0
        while received < MiB:
            chunk = await resp.content.readany()
            assert chunk
            received += len(chunk)
        await asyncio.to_thread(stowage.kill9)
        with contextlib.suppress(aiohttp.ClientError):
            await resp.read()
        resp.close()

    leftovers = tmp_files(stowage)
    assert len(leftovers) == 1
    assert 0 < leftovers[0].stat().st_size < size
    assert not blob_file(stowage, digest).exists()

    await asyncio.to_thread(stowage.start)
    assert tmp_files(stowage) == []
    assert stowage.log_events("cache opened")[-1]["temp_files_swept"] == 1
    assert not blob_file(stowage, digest).exists()
    assert digest not in index_rows(stowage, "blobs")

    fake_upstream.set_blob(digest, FakeBlob(data, chunk=MiB))
    async with client_session() as session:
        assert await get_and_hash(session, url) == (200, digest, size)
        await until(lambda: blob_file(stowage, digest).exists(), 5, "the fill to be committed")
    assert blob_file(stowage, digest).read_bytes() == data
    await until(lambda: index_rows(stowage, "blobs") == {digest: size}, 5, "the index row")


def test_kill9_after_complete_pull_serves_everything_from_cache(
    registry_factory: RegistryFactory, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    reg = registry_factory()
    image = push_image(reg, "library/durable", "1", seed="kill-after-pull")
    stowage = stowage_factory(upstreams=[reg], tag_ttl=300)
    name = f"{stowage.host}/{reg.path_prefix}/library/durable"
    assert_pulled(skopeo_pull(f"{name}:1", tmp_path / "warm"), tmp_path / "warm", image)

    expected = {image.manifest_digest: len(image.manifest_bytes), **dict(image.blobs)}
    assert files_under_blobs(stowage) == expected
    assert stowage.metric("stowage_cache_size_bytes") == sum(expected.values())

    stowage.kill9()
    reg.stop()
    stowage.start()

    # The index agrees with the files: nothing dropped, nothing adopted, no orphans.
    opened = stowage.log_events("cache opened")
    assert len(opened) == 2
    assert opened[-1]["rows_dropped"] == 0
    assert opened[-1]["blobs_adopted"] == 0
    assert opened[-1]["temp_files_swept"] == 0
    indexed = {**index_rows(stowage, "blobs"), **index_rows(stowage, "manifests")}
    assert indexed == expected == files_under_blobs(stowage)
    assert stowage.metric("stowage_cache_size_bytes") == sum(expected.values())

    for ref, dest in ((f"{name}:1", "by-tag"), (f"{name}@{image.manifest_digest}", "by-digest")):
        assert_pulled(skopeo_pull(ref, tmp_path / dest), tmp_path / dest, image)
    assert requests_metric(stowage, "manifests", "hit") >= 2
    assert requests_metric(stowage, "blobs", "hit") >= len(image.blobs)
    assert stowage.metric("stowage_upstream_requests") == 0
