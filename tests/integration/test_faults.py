"""The fault suite: stowage breaks for real and must keep serving what it can, answer the rest
with a clear error, and leave the cache consistent.

Covered here: upstream refused / 503 (stale + a clear error when uncached), 429 with
Retry-After (no retry storm), an upstream that accepts and never answers or never accepts
(timeouts, stale within --revalidate-timeout, bounded failure), corrupted blob and manifest
files (``stowage cache verify``, verification on read), kill -9 during fills and index writes,
a full disk (tmpfs), a read-only data directory, and a lost or corrupt SQLite index (rebuilt
at start-up, ``stowage cache reindex``).

Covered in test_caching.py and not repeated: the basic outage matrix of a cached image
(stopped / 500 / 429 / deleted), 429 with nothing cached, an upstream cut mid-blob, blob and
manifest digest mismatches, kill -9 in the middle of one fill.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest

from tests.conftest import FaultFactory, RegistryFactory, StowageFactory
from tests.integration.test_caching import (
    FakeBlob,
    FakeManifest,
    FakeUpstream,
    blob_file,
    client_session,
    get_and_hash,
    oci_error,
    random_blob,
    requests_metric,
    tmp_files,
)
from tests.support.images import PushedImage, push_image
from tests.support.regclient import ACCEPT_ALL_MANIFESTS, OCI_INDEX, OCI_MANIFEST, sha256_digest
from tests.support.registry import Registry
from tests.support.stowage import Stowage, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KiB = 1024
MiB = 1024 * KiB
MANIFEST_HEADERS = {"Accept": ACCEPT_ALL_MANIFESTS}
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


# --- synthetic images on the scriptable upstream ----------------------------------------------


@dataclass(frozen=True)
class FakeImage:
    repository: str
    tag: str
    manifest: bytes
    digest: str
    media_type: str
    blobs: dict[str, bytes]  # config and layers (empty for an index)


def add_image(
    fake: FakeUpstream,
    repository: str,
    tag: str,
    seed: str,
    layer_sizes: Sequence[int] = (256 * KiB,),
    blob: Callable[[bytes], FakeBlob] = FakeBlob,
) -> FakeImage:
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "seed": seed,
        }
    ).encode()
    blobs = {sha256_digest(config): config}
    layers = []
    for i, size in enumerate(layer_sizes):
        data, digest = random_blob(size, f"{seed}-{i}")
        blobs[digest] = data
        layers.append({"mediaType": LAYER_TYPE, "digest": digest, "size": size})
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": layers,
        }
    ).encode()
    for digest, data in blobs.items():
        fake.set_blob(digest, blob(data))
    digest = sha256_digest(body)
    fake.set_manifest(repository, tag, FakeManifest(body))
    fake.set_manifest(repository, digest, FakeManifest(body))
    return FakeImage(repository, tag, body, digest, OCI_MANIFEST, blobs)


def add_index(
    fake: FakeUpstream, repository: str, tag: str, children: Sequence[FakeImage]
) -> FakeImage:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": child.media_type,
                    "digest": child.digest,
                    "size": len(child.manifest),
                    "platform": {"os": "linux", "architecture": arch},
                }
                for child, arch in zip(children, ("amd64", "arm64", "s390x"), strict=False)
            ],
        }
    ).encode()
    digest = sha256_digest(body)
    fake.set_manifest(repository, tag, FakeManifest(body, content_type=OCI_INDEX))
    fake.set_manifest(repository, digest, FakeManifest(body, content_type=OCI_INDEX))
    return FakeImage(repository, tag, body, digest, OCI_INDEX, {})


def manifest_path(prefix: str, image: FakeImage, ref: str | None = None) -> str:
    return f"/v2/{prefix}/{image.repository}/manifests/{ref or image.tag}"


def blob_path(prefix: str, repository: str, digest: str) -> str:
    return f"/v2/{prefix}/{repository}/blobs/{digest}"


def pull(stowage: Stowage, prefix: str, image: FakeImage, by_digest: bool = False) -> None:
    """Fetch an image's manifest and blobs through stowage, checking every byte."""
    resp = stowage.get(manifest_path(prefix, image, image.digest if by_digest else None))
    assert resp.status == 200, resp.body
    assert resp.body == image.manifest
    for digest, data in image.blobs.items():
        blob = stowage.get(blob_path(prefix, image.repository, digest))
        assert blob.status == 200, blob.body
        assert blob.body == data


# --- inspecting the data directory ------------------------------------------------------------


def files_on_disk(data: Path) -> dict[str, int]:
    root = data / "blobs"
    return {
        f"{p.parent.parent.name}:{p.name}": p.stat().st_size for p in root.rglob("*") if p.is_file()
    }


def query(data: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{data / 'index.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def assert_cache_consistent(data: Path, *, all_indexed: bool = False) -> dict[str, int]:
    """Nothing partial: tmp/ is empty, every file under blobs/ matches its digest, every index
    row has its file (of the recorded size), every tag points at an indexed manifest.
    ``all_indexed``: every file has a row as well (after a start-up reconciliation)."""
    tmp = data / "tmp"
    assert not tmp.exists() or sorted(tmp.iterdir()) == [], "temporary files left behind"
    files = files_on_disk(data)
    for digest in files:
        hex_ = digest.split(":", 1)[1]
        content = (data / "blobs" / "sha256" / hex_[:2] / hex_).read_bytes()
        assert sha256_digest(content) == digest, f"{digest} on disk does not match its digest"
    assert query(data, "PRAGMA integrity_check") == [("ok",)]
    rows = dict(
        query(data, "SELECT digest, size FROM blobs UNION ALL SELECT digest, size FROM manifests")
    )
    for digest, size in rows.items():
        assert files.get(digest) == size, f"index row {digest} ({size} B) without its file"
    manifests = {r[0] for r in query(data, "SELECT digest FROM manifests")}
    tagged = {r[0] for r in query(data, "SELECT digest FROM tags")}
    assert tagged <= manifests, f"tags without their manifest: {tagged - manifests}"
    if all_indexed:
        assert set(files) <= set(rows), f"files without index rows: {set(files) - set(rows)}"
    return files


cli = run_cli


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def elapsed(start: float) -> float:
    return time.monotonic() - start


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


StowageOn = Callable[..., Stowage]


@pytest.fixture
def stowage_on(tmp_path: Path) -> Iterator[StowageOn]:
    """``stowage_on(data_dir, upstreams=[...], insecure=[...], **Stowage kwargs)``: a stowage
    whose data directory the test chooses (a tmpfs mount); stopped at teardown."""
    started: list[Stowage] = []

    def make(
        data: Path, *, upstreams: Sequence[Registry] = (), insecure: Sequence[str] = (), **kw: Any
    ) -> Stowage:
        hosts = [r.host for r in upstreams] + list(insecure)
        kw.setdefault("log_file", tmp_path / f"stowage-on-{len(started)}.log")
        instance = Stowage(data, insecure_registries=hosts, **kw)
        started.append(instance)
        return instance.start()

    yield make
    for instance in started:
        instance.stop()
        print(f"--- stowage {instance.host} log tail ({instance.log_file}) ---")
        print(instance.log_tail())


Tmpfs = Callable[[str], Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """``tmpfs("8m") -> mount point``: a small tmpfs, unmounted at teardown (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount not installed")
    mounted: list[Path] = []

    def make(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (no CAP_SYS_ADMIN?): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount(point: Path, mode: str) -> None:
    proc = subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(point)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def fill_disk(path: Path, leave: int = 0) -> None:
    """Write ``path`` until the filesystem has no block left, then give ``leave`` bytes back."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (MiB, 64 * KiB, 4 * KiB, 512, 1):
            while True:
                try:
                    f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        if leave:
            f.truncate(f.tell() - leave)


class HangingUpstream:
    """Listens on a port and never answers.

    ``accept=True``: connections are accepted and left silent (the first-byte timeout
    fires). ``accept=False``: the listen queue is kept full, so connects hang (the connect
    timeout fires)."""

    def __init__(self, port: int, *, accept: bool = True) -> None:
        self.port = port
        self.accept = accept
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def accepted(self) -> int:
        return len(self._conns) if self.accept else 0

    def start(self) -> Self:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._sock = sock
        if self.accept:
            sock.listen(64)
            sock.settimeout(0.1)
            self._thread = threading.Thread(target=self._accept, daemon=True)
            self._thread.start()
        else:
            sock.listen(0)
            # One connection fills the queue; the kernel drops further SYNs.
            self._conns.append(socket.create_connection(("127.0.0.1", self.port), timeout=2))
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for conn in self._conns:
            conn.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@pytest.fixture
def hanging() -> Iterator[Callable[..., HangingUpstream]]:
    started: list[HangingUpstream] = []

    def make(port: int, *, accept: bool = True) -> HangingUpstream:
        server = HangingUpstream(port, accept=accept)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


# --- upstream refused / 503 -------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["refused", "503"])
def test_outage_serves_cached_content_at_once_and_names_upstream_for_the_rest(
    outage: str, fake: FakeUpstream, fault_server: FaultFactory, stowage_factory: StowageFactory
) -> None:
    image = add_image(fake, "library/app", "1", f"outage-{outage}")
    other = add_image(fake, "library/app", "2", f"outage-{outage}-uncached")
    stowage = stowage_factory(insecure_registries=[fake.host], tag_ttl=1)
    pull(stowage, fake.prefix, image)
    stowage.settle()

    fake.stop()
    fault = None
    if outage == "503":
        fault = fault_server(port=fake.port, status=503, body="down for maintenance")
    time.sleep(1.1)  # the tag expired: stowage has to ask upstream, and fails

    # Cached: served at once (a refused or 503 answer is not waited out), bytes exact.
    start = time.monotonic()
    resp = stowage.get(manifest_path(fake.prefix, image), MANIFEST_HEADERS)
    assert resp.status == 200, resp.body
    assert resp.body == image.manifest
    assert resp.header("Docker-Content-Digest") == image.digest
    assert elapsed(start) < 1.0
    assert requests_metric(stowage, "manifests", "stale") == 1
    pull(stowage, fake.prefix, image, by_digest=True)

    # Uncached: a clear error naming the upstream and what went wrong.
    reason = "unreachable" if outage == "refused" else "503"
    for path in (
        manifest_path(fake.prefix, other),
        manifest_path(fake.prefix, other, other.digest),
        *(blob_path(fake.prefix, other.repository, d) for d in other.blobs),
    ):
        resp = stowage.get(path, MANIFEST_HEADERS)
        assert resp.status == 502, (path, resp.status, resp.body)
        error = oci_error(resp.body)
        assert error["code"] == "UNAVAILABLE"
        assert fake.host in error["message"] and reason in error["message"], error
        assert "nothing is cached" in error["message"], error
    if fault is not None:
        assert fault.count("*", "/manifests/sha256:") == 1  # only the uncached digest
        assert fault.count("*", f"/blobs/{next(iter(image.blobs))}") == 0

    # Upstream back: the uncached image fills, the cached tag is fresh again.
    if fault is not None:
        fault.stop()
    fake.start()
    pull(stowage, fake.prefix, other)
    heads = fake.count("HEAD", "/library/app/manifests/1")
    assert stowage.get(manifest_path(fake.prefix, image), MANIFEST_HEADERS).body == image.manifest
    assert fake.count("HEAD", "/library/app/manifests/1") == heads + 1
    stowage.settle()
    assert_cache_consistent(stowage.data_dir)


# --- 429 with Retry-After ---------------------------------------------------------------------


async def test_429_retry_after_is_honoured_without_a_retry_storm(
    fake: FakeUpstream, fault_server: FaultFactory, stowage_factory: StowageFactory
) -> None:
    image = add_image(fake, "library/limited", "1", "limited-cached")
    uncached = [add_image(fake, "library/limited", f"u{i}", f"limited-{i}") for i in range(10)]
    stowage = stowage_factory(insecure_registries=[fake.host], tag_ttl=1)
    await asyncio.to_thread(pull, stowage, fake.prefix, image)
    await asyncio.to_thread(stowage.settle)
    fake.stop()
    fault = fault_server(port=fake.port, status=429, headers={"Retry-After": "3"})
    await asyncio.sleep(1.1)  # the cached tag expired

    base = stowage.url
    async with client_session() as session:

        async def get(path: str) -> tuple[int, bytes, str | None]:
            async with session.get(base + path, headers=MANIFEST_HEADERS) as resp:
                return resp.status, await resp.read(), resp.headers.get("Retry-After")

        first = await get(manifest_path(fake.prefix, uncached[0]))
        limited_at = time.monotonic()
        assert first[0] == 429 and first[2] == "3", first
        assert fault.request_count == 1

        # Many clients within the window: uncached manifests and blobs, the expired tag,
        # cached blobs. None of them reaches upstream.
        paths = [manifest_path(fake.prefix, u) for u in uncached]
        paths += [blob_path(fake.prefix, u.repository, d) for u in uncached for d in u.blobs]
        cached = [manifest_path(fake.prefix, image)] * 10
        cached += [blob_path(fake.prefix, image.repository, d) for d in image.blobs] * 5
        while elapsed(limited_at) < 2.0:  # well inside the 3 s window
            results = await asyncio.gather(*(get(p) for p in paths + cached))
            for path, (status, body, retry_after) in zip(paths, results, strict=False):
                assert status == 429, (path, status, body)
                assert retry_after is not None and 1 <= int(retry_after) <= 3, retry_after
                assert oci_error(body)["code"] == "TOOMANYREQUESTS"
            for path, (status, body, _) in zip(cached, results[len(paths) :], strict=True):
                assert status == 200, (path, status)
                assert body == image.manifest or sha256_digest(body) in image.blobs
            await asyncio.sleep(0.2)
        assert fault.request_count == 1, [r.path_qs for r in fault.requests]

        # Once Retry-After has passed, upstream is asked again (honoured, not a lock-out).
        await asyncio.sleep(max(0.0, 3.2 - elapsed(limited_at)))
        again = await get(manifest_path(fake.prefix, uncached[1]))
        assert again[0] == 429
        assert fault.request_count == 2
    assert await asyncio.to_thread(requests_metric, stowage, "manifests", "stale") >= 10


# --- an upstream that never answers -----------------------------------------------------------


def test_hanging_upstream_times_out_and_stale_is_served_within_revalidate_timeout(
    fake: FakeUpstream,
    hanging: Callable[..., HangingUpstream],
    stowage_factory: StowageFactory,
) -> None:
    image = add_image(fake, "library/hang", "1", "hang-cached")
    other = add_image(fake, "library/hang", "2", "hang-uncached")
    stowage = stowage_factory(
        insecure_registries=[fake.host],
        tag_ttl=1,
        extra_args=[
            "--connect-timeout",
            "1",
            "--read-timeout",
            "2",
            "--revalidate-timeout",
            "1",
        ],
    )
    pull(stowage, fake.prefix, image)
    stowage.settle()
    fake.stop()
    time.sleep(1.1)  # the tag expired (and stays so: a stale answer does not renew it)

    for accept, timeout, what in (
        (True, 2.0, "no answer within 2s"),
        (False, 1.0, "no connection within 1s"),
    ):
        server = hanging(fake.port, accept=accept)

        # Cached tag: upstream is given --revalidate-timeout, then the cached copy is served.
        start = time.monotonic()
        resp = stowage.get(manifest_path(fake.prefix, image), MANIFEST_HEADERS)
        took = elapsed(start)
        assert resp.status == 200, resp.body
        assert resp.body == image.manifest
        assert 0.9 <= took < 2.0, took
        # Content by digest never waits for upstream.
        start = time.monotonic()
        pull(stowage, fake.prefix, image, by_digest=True)
        assert elapsed(start) < 1.0

        # Uncached: fails after the connect or first-byte timeout, naming the upstream.
        for path in (
            manifest_path(fake.prefix, other),
            blob_path(fake.prefix, other.repository, next(iter(other.blobs))),
        ):
            start = time.monotonic()
            resp = stowage.get(path, MANIFEST_HEADERS)
            took = elapsed(start)
            assert resp.status == 504, (path, resp.status, resp.body)  # gateway timeout
            message = oci_error(resp.body)["message"]
            assert fake.host in message and what in message, message
            assert timeout - 0.1 <= took < timeout + 1.5, (path, took)
        if accept:
            assert server.accepted >= 3  # the revalidation and both uncached requests
        server.stop()
    assert stowage.get(manifest_path(fake.prefix, other)).status == 502  # refused now
    assert requests_metric(stowage, "manifests", "stale") == 2
    assert "serving stale manifest" in stowage.log_text()


# --- corrupted files on disk ------------------------------------------------------------------


def test_cache_verify_removes_corrupt_files_and_the_next_request_refills(
    fake: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    image = add_image(fake, "library/rot", "1", "rot", layer_sizes=(512 * KiB, 300 * KiB, 64 * KiB))
    stowage = stowage_factory(insecure_registries=[fake.host])
    data = stowage.data_dir
    pull(stowage, fake.prefix, image)
    stowage.settle()
    clean = cli("cache", "verify", "--data", str(data))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "verified 5 files" in clean.stdout and "0 corrupt" in clean.stdout

    config, flipped, truncated, deleted = image.blobs
    flip_byte(blob_file(stowage, flipped))  # bit rot: same size, other bytes
    path = blob_file(stowage, truncated)
    path.write_bytes(path.read_bytes()[:1000])
    blob_file(stowage, deleted).unlink()  # a row without its file
    flip_byte(blob_file(stowage, image.digest), offset=image.manifest.index(b"layers") + 1)

    # Verified while stowage keeps serving the same directory.
    proc = cli("cache", "verify", "--data", str(data))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"corrupt blob {flipped}" in out
    assert f"corrupt blob {truncated}" in out
    assert f"corrupt manifest {image.digest}" in out
    assert f"tag {fake.host}/library/rot:1 dropped" in out
    assert f"missing blob {deleted}" in out
    assert config not in out
    for digest in (flipped, truncated, image.digest):
        assert not blob_file(stowage, digest).exists()
    indexed = {
        r[0] for r in query(data, "SELECT digest FROM blobs UNION SELECT digest FROM manifests")
    }
    assert indexed == {config}
    assert query(data, "SELECT * FROM tags") == []
    assert_cache_consistent(data)

    # The next requests fetch what was removed, and only that.
    gets = {d: fake.count("GET", f"/blobs/{d}") for d in image.blobs}
    manifest_gets = fake.count("GET", "/library/rot/manifests/1")
    pull(stowage, fake.prefix, image)
    stowage.settle()
    assert fake.count("GET", "/library/rot/manifests/1") == manifest_gets + 1
    for digest in image.blobs:
        assert fake.count("GET", f"/blobs/{digest}") == gets[digest] + (digest != config)
    assert assert_cache_consistent(data, all_indexed=True) == {
        image.digest: len(image.manifest),
        **{d: len(b) for d, b in image.blobs.items()},
    }
    again = cli("cache", "verify", "--data", str(data))
    assert again.returncode == 0, again.stdout
    assert "0 corrupt removed, 0 index entries without a file dropped" in again.stdout


def test_corrupt_manifest_file_is_never_served_and_is_fetched_again(
    fake: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    image = add_image(fake, "library/flip", "1", "flip-manifest")
    stowage = stowage_factory(insecure_registries=[fake.host], tag_ttl=300)
    data = stowage.data_dir
    pull(stowage, fake.prefix, image)
    stowage.settle()
    stowage.stop()  # the verified copy in memory goes; the next read is from disk
    flip_byte(blob_file(stowage, image.digest), offset=image.manifest.index(b"layers") + 1)
    corrupt = blob_file(stowage, image.digest).read_bytes()
    assert corrupt != image.manifest

    # Upstream down: the corrupt copy is an error, never an answer.
    fake.stop()
    stowage.start()
    for ref in (image.digest, image.tag):
        resp = stowage.get(manifest_path(fake.prefix, image, ref), MANIFEST_HEADERS)
        assert resp.status == 502, (ref, resp.status)
        assert resp.body != corrupt
    assert not blob_file(stowage, image.digest).exists()
    assert query(data, "SELECT digest FROM manifests") == []
    assert query(data, "SELECT tag FROM tags") == []  # no tag left pointing at it
    assert "cached manifest corrupted" in stowage.log_text()
    assert_cache_consistent(data)

    # Upstream back: fetched again and cached again, exact bytes.
    fake.start()
    gets = fake.count("GET", "/library/flip/manifests/")
    resp = stowage.get(manifest_path(fake.prefix, image), MANIFEST_HEADERS)
    assert resp.status == 200
    assert resp.body == image.manifest
    assert fake.count("GET", "/library/flip/manifests/") == gets + 1
    assert blob_file(stowage, image.digest).read_bytes() == image.manifest
    hits = requests_metric(stowage, "manifests", "hit")
    resp = stowage.get(manifest_path(fake.prefix, image, image.digest), MANIFEST_HEADERS)
    assert resp.body == image.manifest
    assert requests_metric(stowage, "manifests", "hit") == hits + 1
    assert_cache_consistent(data)


# --- kill -9 ----------------------------------------------------------------------------------


async def test_kill9_during_fills_and_index_writes_restarts_clean(
    fake: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    per_round = 150
    rounds: list[list[FakeImage]] = []
    for round_ in range(2):
        batch = []
        for i in range(per_round):
            body = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {
                        "mediaType": CONFIG_TYPE,
                        "digest": sha256_digest(b"%d-%d" % (round_, i)),
                        "size": 1,
                    },
                    "layers": [],
                }
            ).encode()
            tag = f"r{round_}-{i}"
            # Answers spread over 2 s: stowage writes manifests and tags all along.
            fake.set_manifest("library/many", tag, FakeManifest(body, delay=2 * i / per_round))
            batch.append(
                FakeImage("library/many", tag, body, sha256_digest(body), OCI_MANIFEST, {})
            )
        rounds.append(batch)
    everything = [m for batch in rounds for m in batch]
    slow: dict[str, bytes] = {}
    for i in range(4):
        data, digest = random_blob(4 * MiB, f"kill-slow-{i}")
        fake.set_blob(digest, FakeBlob(data, delay=3.0 / 64))  # 64 chunks over ~3 s
        slow[digest] = data
    stowage = stowage_factory(insecure_registries=[fake.host])
    base = stowage.url

    async def fetch(
        session: aiohttp.ClientSession, manifests: list[FakeImage], kill_after: int | None
    ) -> int:
        """Fetch the slow blobs and ``manifests`` at once; kill -9 stowage once
        ``kill_after`` manifests arrived. Returns how many arrived."""
        done = 0
        enough = asyncio.Event()

        async def manifest(m: FakeImage) -> None:
            nonlocal done
            url = base + manifest_path(fake.prefix, m)
            async with session.get(url, headers=MANIFEST_HEADERS) as r:
                assert r.status == 200
                assert await r.read() == m.manifest
            done += 1
            if kill_after is not None and done >= kill_after:
                enough.set()

        async def blob(digest: str) -> None:
            url = base + blob_path(fake.prefix, "library/many", digest)
            assert await get_and_hash(session, url) == (200, digest, len(slow[digest]))

        tasks = [asyncio.ensure_future(blob(d)) for d in slow]
        tasks += [asyncio.ensure_future(manifest(m)) for m in manifests]
        if kill_after is None:
            await asyncio.gather(*tasks)
            return done
        await asyncio.wait_for(enough.wait(), 30)
        await asyncio.to_thread(stowage.kill9)
        await asyncio.gather(*tasks, return_exceptions=True)
        return done

    for batch, kill_after in zip(rounds, (10, 60), strict=True):
        async with client_session() as session:
            done = await fetch(session, batch, kill_after)
        assert kill_after <= done < per_round, done  # killed in the middle of the writes
        leftovers = tmp_files(stowage)
        assert leftovers, "the slow fills were in flight"
        assert not any(blob_file(stowage, d).exists() for d in slow)

        await asyncio.to_thread(stowage.start)
        opened = stowage.log_events("cache opened")[-1]
        assert opened["temp_files_swept"] == len(leftovers)
        await asyncio.to_thread(assert_cache_consistent, stowage.data_dir, all_indexed=True)
        tags = dict(
            await asyncio.to_thread(query, stowage.data_dir, "SELECT tag, digest FROM tags")
        )
        # Every manifest a client received had been recorded first: none is lost.
        assert sum(m.tag in tags for m in batch) >= done
        for m in batch:
            assert tags.get(m.tag) in (None, m.digest)

    # Everything is served correctly afterwards, and the cache ends complete and consistent.
    async with client_session() as session:
        assert await fetch(session, everything, None) == len(everything)
    await asyncio.to_thread(stowage.settle)
    files = await asyncio.to_thread(assert_cache_consistent, stowage.data_dir, all_indexed=True)
    assert {m.digest for m in everything} | set(slow) <= set(files)


# --- disk full and read-only ------------------------------------------------------------------


def pull_registry_image(stowage: Stowage, reg: Registry, image: PushedImage) -> None:
    name = f"/v2/{reg.path_prefix}/{image.repository}"
    for ref in (image.tag, image.manifest_digest):
        resp = stowage.get(f"{name}/manifests/{ref}", MANIFEST_HEADERS)
        assert resp.status == 200, resp.body
        assert resp.body == image.manifest_bytes
    for digest, size in image.blobs:
        resp = stowage.get(f"{name}/blobs/{digest}")
        assert resp.status == 200, resp.body
        assert len(resp.body) == size and sha256_digest(resp.body) == digest


def test_disk_full_serves_from_upstream_and_caching_resumes_when_space_returns(
    tmpfs: Tmpfs, registry_factory: RegistryFactory, stowage_on: StowageOn
) -> None:
    reg = registry_factory()
    image = push_image(reg, "library/full", "1", layer_sizes=(1 * MiB, 2 * MiB), seed="disk-full")
    mount = tmpfs("8m")
    stowage = stowage_on(mount / "data", upstreams=[reg], extra_args=["--cache-retry", "1"])
    # Room for the manifest and the config, not for a layer: its fill runs out of space
    # half-way, under a client that is then finished from upstream (Range); for the next
    # --cache-retry seconds blobs pass through uncached, then a fill is tried again.
    fill_disk(mount / "filler", leave=512 * KiB)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        pull_registry_image(stowage, reg, image)
        time.sleep(0.2)
    stowage.settle()
    assert stowage.running()
    log = stowage.log_text()
    assert log.count("caching paused: serving uncached") >= 2, log  # retried after 1 s
    assert "No space left on device" in log
    assert "Traceback" not in log
    for digest, _ in image.layers:
        assert not blob_file(stowage, digest).exists()
    files = assert_cache_consistent(stowage.data_dir)
    assert image.config_digest in files  # what fitted was cached
    assert requests_metric(stowage, "blobs", "error") == 0

    # Space returns: after --cache-retry, pulls fill the cache again.
    (mount / "filler").unlink()
    time.sleep(1.2)
    pull_registry_image(stowage, reg, image)
    stowage.settle()
    files = assert_cache_consistent(stowage.data_dir, all_indexed=True)
    assert {image.manifest_digest, *(d for d, _ in image.blobs)} <= set(files)
    since = reg.checkpoint()
    pull_registry_image(stowage, reg, image)
    assert reg.count("GET", "/blobs/", since=since) == 0  # all from the cache now


def test_read_only_data_dir_passes_through_uncached(
    tmpfs: Tmpfs, registry_factory: RegistryFactory, stowage_on: StowageOn
) -> None:
    reg = registry_factory()
    cached = push_image(reg, "library/ro", "1", seed="ro-cached")
    fresh = push_image(reg, "library/ro", "2", seed="ro-fresh")
    mount = tmpfs("16m")
    stowage = stowage_on(mount / "data", upstreams=[reg])
    pull_registry_image(stowage, reg, cached)
    stowage.settle()
    stowage.stop()
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in mount.rglob("*")}

    remount(mount, "ro")
    stowage.start()  # starts on a read-only directory
    # What the cache holds is served from it: tag, manifest and blobs, upstream untouched
    # (the index is read into memory, since SQLite cannot open it for writing).
    since = reg.checkpoint()
    pull_registry_image(stowage, reg, cached)
    assert reg.count("*", "/library/ro/", since=since) == 0
    pull_registry_image(stowage, reg, fresh)  # the rest passes through
    since = reg.checkpoint()
    for digest, _ in cached.blobs:
        assert stowage.get(f"/v2/{reg.path_prefix}/library/ro/blobs/{digest}").status == 200
    assert reg.count("GET", "/blobs/", since=since) == 0
    stowage.settle()
    assert stowage.running()
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in mount.rglob("*")} == before
    log = stowage.log_text()
    assert "index not writable: serving what is cached, caching is off" in log
    assert "Traceback" not in log

    # Writable again: caching resumes at the next start.
    stowage.stop()
    remount(mount, "rw")
    stowage.start()
    pull_registry_image(stowage, reg, fresh)
    stowage.settle()
    files = assert_cache_consistent(stowage.data_dir, all_indexed=True)
    assert {fresh.manifest_digest, *(d for d, _ in fresh.blobs)} <= set(files)


# --- the SQLite index lost or corrupt ---------------------------------------------------------


def populate(fake: FakeUpstream, stowage: Stowage) -> tuple[FakeImage, FakeImage, FakeImage]:
    """An index of two platform manifests, pulled through stowage; (index, amd64, arm64)."""
    amd = add_image(fake, "library/multi", "amd64", "multi-amd64", layer_sizes=(200 * KiB,))
    arm = add_image(fake, "library/multi", "arm64", "multi-arm64", layer_sizes=(300 * KiB,))
    index = add_index(fake, "library/multi", "1", [amd, arm])
    resp = stowage.get(manifest_path(fake.prefix, index), MANIFEST_HEADERS)
    assert resp.body == index.manifest
    for child in (amd, arm):
        pull(stowage, fake.prefix, child, by_digest=True)
    stowage.settle()
    return index, amd, arm


def assert_served_from_cache_by_digest(
    stowage: Stowage, fake: FakeUpstream, images: Sequence[FakeImage]
) -> None:
    for image in images:
        resp = stowage.get(manifest_path(fake.prefix, image, image.digest), MANIFEST_HEADERS)
        assert resp.status == 200, resp.body
        assert resp.body == image.manifest
        assert resp.header("Content-Type") == image.media_type
        assert resp.header("Docker-Content-Digest") == image.digest
        for digest, data in image.blobs.items():
            assert stowage.get(blob_path(fake.prefix, image.repository, digest)).body == data


@pytest.mark.parametrize("damage", ["deleted", "garbage", "truncated"])
def test_lost_or_corrupt_index_is_rebuilt_at_start_up(
    damage: str, fake: FakeUpstream, stowage_factory: StowageFactory
) -> None:
    stowage = stowage_factory(insecure_registries=[fake.host], tag_ttl=300)
    data = stowage.data_dir
    index, amd, arm = populate(fake, stowage)
    db = data / "index.db"
    if damage == "deleted":
        stowage.kill9()  # no clean close: the WAL holds the last commits, and goes too
        for name in ("index.db", "index.db-wal", "index.db-shm"):
            (data / name).unlink(missing_ok=True)
    else:
        stowage.stop()  # everything checkpointed into index.db, which is then damaged
        assert not (data / "index.db-wal").exists()
        if damage == "garbage":
            db.write_bytes(random_blob(64 * KiB, "garbage")[0])
        else:  # a valid header, then pages cut off and overwritten
            db.write_bytes(db.read_bytes()[:100] + b"\xff" * 4096)

    fake.stop()  # nothing can come from upstream: only the rebuilt index can serve
    stowage.start()
    log = stowage.log_text()
    assert "index rebuilt from the content on disk" in log
    assert "tags and repository names cannot be recovered" in log
    moved = sorted(data.glob("index.db.corrupt-*"))
    if damage == "deleted":
        assert moved == []
    else:
        assert [p.name for p in moved if not p.name.endswith(("-wal", "-shm"))], moved
    rows = dict(query(data, "SELECT digest, media_type FROM manifests"))
    assert rows == {index.digest: OCI_INDEX, amd.digest: OCI_MANIFEST, arm.digest: OCI_MANIFEST}
    refs = set(query(data, "SELECT parent, child, kind FROM manifest_refs"))
    assert (index.digest, amd.digest, "manifest") in refs
    assert {(amd.digest, d) for d in amd.blobs} <= {(p, c) for p, c, _ in refs}
    assert_cache_consistent(data, all_indexed=True)

    assert_served_from_cache_by_digest(stowage, fake, [index, amd, arm])
    # The tag is not in the content: with upstream down it cannot be answered ...
    resp = stowage.get(manifest_path(fake.prefix, index), MANIFEST_HEADERS)
    assert resp.status == 502
    # ... and one pull by tag restores it.
    fake.start()
    resp = stowage.get(manifest_path(fake.prefix, index), MANIFEST_HEADERS)
    assert resp.body == index.manifest
    assert query(data, "SELECT tag, digest FROM tags") == [("1", index.digest)]
    gets = fake.count("GET", "/blobs/")
    assert_served_from_cache_by_digest(stowage, fake, [amd, arm])
    assert fake.count("GET", "/blobs/") == gets


def test_cache_reindex_command(fake: FakeUpstream, stowage_factory: StowageFactory) -> None:
    stowage = stowage_factory(insecure_registries=[fake.host], tag_ttl=300)
    data = stowage.data_dir
    index, amd, arm = populate(fake, stowage)
    stowage.stop()

    # A readable index is rebuilt in place and keeps its tags.
    proc = cli("cache", "reindex", "--data", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "indexed 4 blobs and 3 manifests" in proc.stdout
    assert "1 tags kept, 0 dropped" in proc.stdout
    assert query(data, "SELECT tag, digest FROM tags") == [("1", index.digest)]
    assert_cache_consistent(data, all_indexed=True)

    # A corrupt one: the other cache commands refuse with a pointer to reindex ...
    (data / "index.db").write_bytes(b"this is not a database" * 100)
    ls = cli("cache", "ls", "--data", str(data))
    assert ls.returncode != 0
    assert "cache reindex" in ls.stderr and "Traceback" not in ls.stderr
    # ... and reindex moves it aside and rebuilds it from the files.
    proc = cli("cache", "reindex", "--data", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "moved aside" in proc.stdout
    assert "tags and repository names cannot be recovered" in proc.stdout
    assert "indexed 4 blobs and 3 manifests" in proc.stdout
    [moved] = [p for p in data.glob("index.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert moved.read_bytes().startswith(b"this is not a database")
    assert_cache_consistent(data, all_indexed=True)
    assert cli("cache", "verify", "--data", str(data)).returncode == 0

    fake.stop()
    stowage.start()
    assert "index rebuilt" not in stowage.log_text()  # already healthy
    assert_served_from_cache_by_digest(stowage, fake, [index, amd, arm])


def test_cache_verify_and_reindex_on_a_missing_cache_fail_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    verify = cli("cache", "verify", "--data", str(missing))
    assert verify.returncode == 2
    assert str(missing) in verify.stderr and "Traceback" not in verify.stderr
    reindex = cli("cache", "reindex", "--data", str(missing))
    assert reindex.returncode == 1
    assert str(missing) in reindex.stderr and "Traceback" not in reindex.stderr
    assert not missing.exists()
