"""The bounded cache with real processes: ``--max-size`` with watermarks evicts the least
recently used images first, never a pinned one, never a blob another cached image still
needs, never a file while a client is reading it; online garbage collection removes
unreferenced content once its grace period is over while pulls go on; the metrics move
and the index always equals the files."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RegistryFactory, StowageFactory
from tests.support.images import PushedImage, push_image
from tests.support.regclient import ACCEPT_ALL_MANIFESTS, sha256_digest
from tests.support.registry import Registry
from tests.support.stowage import Stowage, run_cli
from tests.support.util import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

KiB = 1024
MiB = 1024 * KiB
MANIFEST_HEADERS = {"Accept": ACCEPT_ALL_MANIFESTS}


# --- helpers ----------------------------------------------------------------------------------


def files_of(image: PushedImage) -> dict[str, int]:
    return {image.manifest_digest: len(image.manifest_bytes), **dict(image.blobs)}


def touch(st: Stowage, reg: Registry, image: PushedImage) -> None:
    """Use an image: what a pull of an image already on the node asks (the tag)."""
    resp = st.get(
        f"/v2/{reg.path_prefix}/{image.repository}/manifests/{image.tag}", MANIFEST_HEADERS
    )
    assert resp.status == 200, resp.body
    assert resp.body == image.manifest_bytes


def pull(st: Stowage, reg: Registry, image: PushedImage, *, blobs: bool = True) -> None:
    """The manifest by tag, then every blob, each checked against its digest."""
    touch(st, reg, image)
    if not blobs:
        return
    for digest, size in image.blobs:
        resp = st.get(f"/v2/{reg.path_prefix}/{image.repository}/blobs/{digest}")
        assert resp.status == 200, resp.body
        assert (len(resp.body), sha256_digest(resp.body)) == (size, digest)
    st.settle()


def blob_path(st: Stowage, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return st.data_dir / "blobs" / "sha256" / hex_[:2] / hex_


def files_on_disk(st: Stowage) -> dict[str, int]:
    root = st.data_dir / "blobs"
    return {
        f"{p.parent.parent.name}:{p.name}": p.stat().st_size for p in root.rglob("*") if p.is_file()
    }


def indexed(st: Stowage) -> dict[str, int]:
    con = sqlite3.connect(f"file:{st.data_dir / 'index.db'}?mode=ro", uri=True)
    try:
        return dict(
            con.execute(
                "SELECT digest, size FROM blobs UNION ALL SELECT digest, size FROM manifests"
            ).fetchall()
        )
    finally:
        con.close()


def assert_index_equals_files(st: Stowage) -> dict[str, int]:
    on_disk = files_on_disk(st)
    assert indexed(st) == on_disk
    assert st.metric("stowage_cache_size_bytes") == sum(on_disk.values())
    return on_disk


def cached(st: Stowage, image: PushedImage) -> bool:
    """Every file of the image is on disk (and indexed)."""
    on_disk, rows = files_on_disk(st), indexed(st)
    return all(d in on_disk and d in rows for d in files_of(image))


def gone(st: Stowage, image: PushedImage, *, keep: frozenset[str] = frozenset()) -> bool:
    """No file of the image is left, except ``keep`` (shared with another image)."""
    on_disk, rows = files_on_disk(st), indexed(st)
    return not any(d in on_disk or d in rows for d in files_of(image) if d not in keep)


cli = run_cli


def ls(st: Stowage) -> list[dict[str, Any]]:
    proc = cli("cache", "ls", "--json", "--data", str(st.data_dir))
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def evicted_names(st: Stowage) -> list[str]:
    return [e["image"] for e in st.log_events("evicted")]


def wait_evictions(st: Stowage, count: int, timeout: float = 15.0) -> None:
    wait_until(
        lambda: st.metric("stowage_evictions") >= count,
        timeout=timeout,
        describe=lambda: f"{count} evictions; log: {st.log_tail(15)}",
    )


# --- LRU, pins, shared blobs, metrics -----------------------------------------------------------


def test_lru_images_are_evicted_between_watermarks_keeping_pinned_and_shared(
    registry_factory: RegistryFactory, stowage_factory: StowageFactory
) -> None:
    reg = registry_factory()
    unit = 256 * KiB

    def push(name: str, sizes: tuple[int, ...], seed: str | None = None) -> PushedImage:
        return push_image(reg, f"lru/{name}", "1", layer_sizes=sizes, seed=seed)

    pinned = push("pinned", (unit,))
    old = push("old", (unit,))
    shared1 = push("shared1", (unit, unit), seed="shared")
    shared2 = push("shared2", (unit, unit + 1000), seed="shared")
    recent = push("recent", (unit,))
    extra = push("extra", (unit,))
    extra2 = push("extra2", (unit, unit))
    extra3 = push("extra3", (unit, unit))
    base = shared1.layers[0][0]
    assert shared2.layers[0][0] == base  # one blob, two images

    def distinct(*imgs: PushedImage) -> int:
        sizes: dict[str, int] = {}
        for i in imgs:
            sizes.update(files_of(i))
        return sum(sizes.values())

    # The high watermark lies between the first four images and the fifth.
    t4 = distinct(pinned, old, shared1, shared2)
    t5 = distinct(pinned, old, shared1, shared2, recent)
    max_size = int((t4 + t5) / 2 / 0.85)
    low = int(max_size * 0.80)
    # Evicting shared1 (all but the base) is enough to get under the low watermark.
    assert t5 - (distinct(shared1) - unit) < low < t5 - 1000
    st = stowage_factory(
        upstreams=[reg], extra_args=["--max-size", str(max_size), "--gc-interval", "600"]
    )
    assert st.metric("stowage_evictions") == 0

    for image in (pinned, old, shared1, shared2):
        pull(st, reg, image)
    pinned_name = f"{reg.host}/{pinned.repository}:1"
    proc = cli("cache", "pin", pinned_name, "--data", str(st.data_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pinned" in proc.stdout
    listed = {r["repository"]: r["pinned"] for r in ls(st)}
    assert listed == {i.repository: i is pinned for i in (pinned, old, shared1, shared2)}
    table = cli("cache", "ls", "--data", str(st.data_dir)).stdout
    assert [ln for ln in table.splitlines() if "pinned" in ln.split()] == [
        ln for ln in table.splitlines() if pinned.repository in ln
    ]
    touch(st, reg, old)  # old is used again: now more recent than shared1 and shared2
    time.sleep(0.05)
    assert st.metric("stowage_evictions") == 0
    assert st.metric("stowage_cache_size_bytes") == t4 < max_size * 0.85

    # 1. recent pushes the cache over the high watermark: right after its fill (the periodic
    #    check is 600 s away), the least recently used unpinned image goes: shared1, but not
    #    the base layer shared2 still needs.
    reclaimed = st.metric("stowage_reclaimed_bytes", reason="evict")
    pull(st, reg, recent)
    wait_evictions(st, 1)
    assert gone(st, shared1, keep=frozenset({base}))
    assert blob_path(st, base).exists()
    for image in (pinned, old, shared2, recent):
        assert cached(st, image), image.repository
    size = sum(assert_index_equals_files(st).values())
    assert size <= low
    assert st.metric("stowage_reclaimed_bytes", reason="evict") == reclaimed + t5 - size
    assert st.metric("stowage_evictions") == 1

    # 2. The next LRU image is shared2; the base goes with it, its last user.
    pull(st, reg, extra)
    wait_evictions(st, 2)
    assert gone(st, shared2)
    assert not blob_path(st, base).exists()
    for image in (pinned, old, recent, extra):
        assert cached(st, image), image.repository

    # 3. Then old, used after shared1 and shared2 but before recent; pinned is older still.
    pull(st, reg, extra2)
    wait_evictions(st, 3)
    assert gone(st, old)
    for image in (pinned, recent, extra, extra2):
        assert cached(st, image), image.repository

    # 4. Unpinned, the least recently used image of all goes first, then recent.
    proc = cli("cache", "unpin", pinned_name, "--data", str(st.data_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(r["pinned"] for r in ls(st))
    pull(st, reg, extra3)
    wait_evictions(st, 5)
    for image in (pinned, recent):
        assert gone(st, image), image.repository
    for image in (extra, extra2, extra3):
        assert cached(st, image), image.repository

    names = [f"{reg.host}/{i.repository}:1" for i in (shared1, shared2, old, pinned, recent)]
    assert evicted_names(st) == names
    assert st.metric("stowage_evictions") == 5
    on_disk = assert_index_equals_files(st)
    assert on_disk == {**files_of(extra), **files_of(extra2), **files_of(extra3)}
    assert st.metric("stowage_reclaimed_bytes", reason="evict") == (
        distinct(pinned, old, shared1, shared2, recent, extra, extra2, extra3)
        - sum(on_disk.values())
    )
    assert st.metric("stowage_reclaimed_bytes", reason="gc") == 0
    assert list((st.data_dir / "tmp").iterdir()) == []

    # An evicted image is simply fetched again.
    since = reg.checkpoint()
    pull(st, reg, shared1)
    assert reg.blob_gets(base, since=since) == 1


def test_pin_and_unpin_errors(registry: Registry, stowage_factory: StowageFactory) -> None:
    image = push_image(registry, "lru/pin-errors", "1", layer_sizes=(KiB,))
    st = stowage_factory(upstreams=[registry])
    data = str(st.data_dir)
    name = f"{registry.host}/{image.repository}"
    proc = cli("cache", "pin", f"{name}:1", "--data", data)
    assert proc.returncode != 0 and "not in the cache" in proc.stderr, proc.stderr
    pull(st, registry, image)
    assert cli("cache", "pin", f"{name}:1", "--data", data).returncode == 0
    again = cli("cache", "pin", f"{name}:1", "--data", data)
    assert again.returncode == 0 and "already pinned" in again.stdout
    proc = cli("cache", "unpin", f"{name}:2", "--data", data)
    assert proc.returncode != 0 and "not pinned" in proc.stderr, proc.stderr
    proc = cli("cache", "pin", "Not A Reference", "--data", data)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # cache rm of a pinned image removes it and its pin.
    assert cli("cache", "rm", f"{name}:1", "--data", data).returncode == 0
    pull(st, registry, image)
    assert [r["pinned"] for r in ls(st)] == [False]


# --- a file being read is not deleted -----------------------------------------------------------


class SlowReader:
    """A raw HTTP client with a small receive buffer that reads a little, then stalls."""

    def __init__(self, st: Stowage, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", st.port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {st.host}\r\n\r\n".encode())
        self.head = b""
        while b"\r\n\r\n" not in self.head:
            self.head += self.sock.recv(4096)
        self.head, _, self.body = self.head.partition(b"\r\n\r\n")
        assert self.head.startswith(b"HTTP/1.1 200"), self.head

    def read(self, amount: int) -> None:
        while len(self.body) < amount:
            chunk = self.sock.recv(64 * KiB)
            assert chunk, "connection closed early"
            self.body += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("source", ["cache", "fill"])
def test_a_blob_being_read_is_not_evicted_under_its_reader(
    source: str, registry_factory: RegistryFactory, stowage_factory: StowageFactory
) -> None:
    reg = registry_factory()
    big = push_image(reg, "lru/big", "1", layer_sizes=(16 * MiB,), seed=f"big-{source}")
    other = push_image(reg, "lru/other", "1", layer_sizes=(4 * MiB,), seed=f"other-{source}")
    layer, layer_size = big.layers[0]
    total = sum(files_of(big).values()) + sum(files_of(other).values())
    # big alone fits under the high watermark; big and other do not.
    max_size = int(total / 0.85) - 1 * MiB
    assert sum(files_of(big).values()) < max_size * 0.85 < total
    st = stowage_factory(
        upstreams=[reg], extra_args=["--max-size", str(max_size), "--gc-interval", "600"]
    )
    path = f"/v2/{reg.path_prefix}/{big.repository}/blobs/{layer}"
    if source == "cache":
        pull(st, reg, big)  # then read from the cached file (sendfile)
        reader = SlowReader(st, path)
    else:
        pull(st, reg, big, blobs=False)
        for digest, _ in big.blobs[:1]:  # the config
            assert st.get(f"/v2/{reg.path_prefix}/{big.repository}/blobs/{digest}").status == 200
        reader = SlowReader(st, path)  # joins the fill, reads its growing file
        st.settle()  # the fill completed and was committed under the stalled reader
    try:
        reader.read(256 * KiB)
        assert blob_path(st, layer).exists()

        # other is pinned (its manifest cached first), so only big could make room, and it
        # is being read: eviction must wait.
        pull(st, reg, other, blobs=False)
        name = f"{reg.host}/{other.repository}:1"
        assert cli("cache", "pin", name, "--data", str(st.data_dir)).returncode == 0
        runs = st.metric("stowage_gc_runs")
        pull(st, reg, other)  # over the high watermark now
        wait_until(
            lambda: st.metric("stowage_gc_runs") >= runs + 2,  # the trigger and a retry
            timeout=15,
            describe=lambda: st.log_tail(10),
        )
        assert st.metric("stowage_cache_size_bytes") > max_size * 0.85
        assert st.metric("stowage_evictions") == 0
        assert cached(st, big) and cached(st, other)

        # The stalled client resumes and gets every byte, correct.
        reader.read(layer_size)
    finally:
        reader.close()
    assert len(reader.body) == layer_size
    assert "sha256:" + hashlib.sha256(reader.body).hexdigest() == layer

    # Once nobody reads it, big is evicted on the next retry.
    wait_evictions(st, 1)
    assert gone(st, big)
    assert cached(st, other)
    assert evicted_names(st) == [f"{reg.host}/{big.repository}:1"]
    assert assert_index_equals_files(st) == files_of(other)


# --- garbage collection -------------------------------------------------------------------------


def test_gc_removes_unreferenced_content_after_grace_while_pulls_go_on(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    reg = registry_factory()
    kept = push_image(reg, "gc/kept", "1", layer_sizes=(512 * KiB, 64 * KiB))
    orphaned = push_image(reg, "gc/orphaned", "1", layer_sizes=(300 * KiB,))
    busy = push_image(reg, "gc/busy", "1", layer_sizes=(2 * MiB, 2 * MiB))
    grace = 8.0

    # A verified blob in the data directory without an index row: adopted at start-up.
    data = tmp_path / "data"
    adopted = os.urandom(100 * KiB)
    adopted_digest = sha256_digest(adopted)
    hex_ = adopted_digest.removeprefix("sha256:")
    (data / "blobs" / "sha256" / hex_[:2]).mkdir(parents=True)
    (data / "blobs" / "sha256" / hex_[:2] / hex_).write_bytes(adopted)
    args = ["--gc-interval", "1", "--gc-grace", str(grace), "--max-size", "90%"]
    with Stowage(
        data, insecure_registries=[reg.host], extra_args=args, log_file=tmp_path / "gc.log"
    ) as st:
        try:
            gc_while_pulling(st, reg, kept, orphaned, busy, adopted_digest, len(adopted), grace)
        finally:
            print(st.log_tail())


def gc_while_pulling(
    st: Stowage,
    reg: Registry,
    kept: PushedImage,
    orphaned: PushedImage,
    busy: PushedImage,
    adopted_digest: str,
    adopted_size: int,
    grace: float,
) -> None:
    started = time.monotonic()
    [bounded] = st.log_events("bounded cache")
    fs = os.statvfs(st.data_dir)
    assert bounded["max_size"] == int(fs.f_blocks * fs.f_frsize * 0.9)
    assert indexed(st) == {adopted_digest: adopted_size}

    pull(st, reg, kept)
    # Blobs fetched by digest whose manifest never comes.
    orphan_blobs = dict(orphaned.blobs)
    for digest in orphan_blobs:
        assert st.get(f"/v2/{reg.path_prefix}/{orphaned.repository}/blobs/{digest}").status == 200
    st.settle()

    # Pulls go on all along: none fails, none waits for the collector.
    errors: list[str] = []
    durations: list[float] = []
    stop = threading.Event()

    def puller() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                pull(st, reg, busy)
            except Exception as exc:  # reported below
                errors.append(repr(exc))
            durations.append(time.monotonic() - start)

    thread = threading.Thread(target=puller, daemon=True)
    thread.start()
    try:
        # Within the grace period the orphans stay, though the collector runs every second.
        runs = st.metric("stowage_gc_runs")
        wait_until(lambda: st.metric("stowage_gc_runs") >= runs + 2, timeout=10)
        assert time.monotonic() - started < grace - 1  # (the machine is not too slow)
        assert all(blob_path(st, d).exists() for d in orphan_blobs)
        assert blob_path(st, adopted_digest).exists()

        # After it, they go; everything a manifest references stays.
        wait_until(
            lambda: not any(blob_path(st, d).exists() for d in [*orphan_blobs, adopted_digest]),
            timeout=grace + 10,
            describe=lambda: st.log_tail(10),
        )
        time.sleep(1.5)  # and a few more collections with pulls in flight
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    assert len(durations) >= 3
    assert max(durations) < 5, durations
    for image in (kept, busy):
        assert cached(st, image), image.repository
    reclaimed = sum(orphan_blobs.values()) + adopted_size
    assert st.metric("stowage_reclaimed_bytes", reason="gc") == reclaimed
    assert st.metric("stowage_reclaimed_bytes", reason="evict") == 0
    assert st.metric("stowage_evictions") == 0
    assert st.metric("stowage_gc_runs") >= 4
    on_disk = assert_index_equals_files(st)
    assert on_disk == {**files_of(kept), **files_of(busy)}
