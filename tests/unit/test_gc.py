"""The bounded cache's policy (pure) and its application to a real index and store.

The pure part: size parsing, watermarks, which images go first, what they free, what
garbage collection may take. The second part runs ``Collector.cycle`` against a real
SQLite index and blob files in a temporary directory (no server, no mocks)."""

from __future__ import annotations

import asyncio
import gc as pygc
import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from stowage.oci.digest import Digest
from stowage.settings import ConfigError, load_settings
from stowage.store.gc import (
    Bounds,
    Collector,
    GCConfig,
    Hooks,
    Image,
    Readers,
    SizeLimit,
    Snapshot,
    drop_pins,
    images,
    parse_size,
    pin,
    pinned_digests,
    plan_collection,
    plan_eviction,
    read_snapshot,
    topological,
    unpin,
)
from stowage.store.index import Index, open_index

# --- sizes and settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1073741824", 1073741824),
        (1073741824, 1073741824),
        ("50G", 50 * 10**9),
        ("50g", 50 * 10**9),
        ("50GB", 50 * 10**9),
        ("500MiB", 500 * 2**20),
        ("500Mi", 500 * 2**20),
        ("1.5Gi", 3 * 2**29),
        ("2 KiB", 2048),
        ("10k", 10_000),
        ("1T", 10**12),
        ("7b", 7),
    ],
)
def test_parse_size_bytes(text: str | int, expected: int) -> None:
    limit = parse_size(text)
    assert limit == SizeLimit(expected)
    assert not limit.percent
    assert limit.resolve(Path("/nonexistent")) == expected
    assert parse_size(str(limit)) == limit  # the normalized form round-trips


def test_parse_size_percent_of_filesystem(tmp_path: Path) -> None:
    limit = parse_size("80%")
    assert limit == SizeLimit(80, percent=True)
    assert str(limit) == "80%"
    st = os.statvfs(tmp_path)
    assert limit.resolve(tmp_path) == int(st.f_blocks * st.f_frsize * 0.8)
    assert parse_size("12.5 %").resolve(tmp_path) == int(st.f_blocks * st.f_frsize * 0.125)


@pytest.mark.parametrize("text", ["", "G", "5X", "-1", "0", "0.1", "1.5.5G", "0%", "150%", "50 %%"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("STOWAGE_"):
            monkeypatch.delenv(key)


@pytest.mark.usefixtures("_clean_env")
def test_settings_defaults_and_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.max_size is None and s.size_limit is None
    assert (s.high_watermark, s.low_watermark) == (85, 80)
    assert (s.gc_interval, s.gc_grace) == (60, 3600)
    assert load_settings(max_size="500MiB").size_limit == SizeLimit(500 * 2**20)
    monkeypatch.setenv("STOWAGE_MAX_SIZE", "80%")
    assert load_settings().size_limit == SizeLimit(80, percent=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-size: 1073741824\nhigh-watermark: 90\nlow-watermark: 50\n")
    monkeypatch.delenv("STOWAGE_MAX_SIZE")
    s = load_settings(cfg)
    assert (s.size_limit, s.high_watermark, s.low_watermark) == (SizeLimit(2**30), 90, 50)


@pytest.mark.usefixtures("_clean_env")
@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        ({"max_size": "50X"}, ["--max-size", "'50X'"]),
        ({"max_size": "0%"}, ["--max-size"]),
        ({"low_watermark": 90.0}, ["--low-watermark (90)", "--high-watermark (85)"]),
        ({"high_watermark": 70.0, "low_watermark": 70.0}, ["--low-watermark (70)"]),
        ({"high_watermark": 101.0}, ["high_watermark"]),
        ({"low_watermark": 0.0}, ["low_watermark"]),
        ({"gc_interval": 0.0}, ["gc_interval"]),
        ({"gc_grace": -1.0}, ["gc_grace"]),
    ],
)
def test_settings_errors_name_the_option(flags: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**flags)
    for needle in needles:
        assert needle in str(info.value)


def test_bounds() -> None:
    b = Bounds(1000, 85, 80)
    assert (b.high_bytes, b.low_bytes) == (850, 800)
    assert not b.over(850)
    assert b.over(851)


# --- a snapshot built by hand ---------------------------------------------------------------


def d(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


class Cache:
    """A Snapshot under construction: images with their manifests and blobs."""

    def __init__(self) -> None:
        self.snap = Snapshot()

    def blob(self, name: str, size: int, access: float = 0.0) -> str:
        digest = d(name)
        self.snap.sizes[digest] = size
        self.snap.access[digest] = access
        return digest

    def manifest(self, name: str, refs: list[str], access: float, size: int = 1) -> str:
        digest = d(name)
        self.snap.sizes[digest] = size
        self.snap.access[digest] = access
        self.snap.manifests.add(digest)
        self.snap.refs[digest] = list(refs)
        return digest

    def image(
        self, repo: str, tag: str | None, blobs: dict[str, int], access: float, size: int = 1
    ) -> str:
        digest = self.manifest(f"{repo}:{tag}", [self.blob(b, n) for b, n in blobs.items()], 0)
        self.snap.sizes[digest] = size
        self.snap.access[digest] = access
        self.name(repo, tag, digest, access)
        return digest

    def name(self, repo: str, tag: str | None, digest: str, access: float = 0.0) -> None:
        self.snap.repo_manifests.append(("r.io", repo, digest))
        if tag is not None:
            self.snap.tags.append(("r.io", repo, tag, digest, access))


def test_images_are_ordered_least_recently_used_first() -> None:
    c = Cache()
    a = c.image("a", "1", {"a1": 10}, access=30)
    b = c.image("b", "1", {"b1": 10}, access=10)
    z = c.image("z", None, {"z1": 10}, access=20)  # held by digest only
    order = images(c.snap)
    assert [i.digest for i in order] == [b, z, a]
    assert order[1].names == (("r.io", "z", None),)
    assert str(order[0]) == "r.io/b:1"
    assert str(order[1]) == f"r.io/z@{z}"


def test_an_index_and_its_platform_manifests_are_one_image() -> None:
    c = Cache()
    amd = c.manifest("amd", [c.blob("amd-layer", 100)], access=50)
    arm = c.manifest("arm", [c.blob("arm-layer", 100)], access=0)
    index = c.manifest("index", [amd, arm], access=5)
    c.name("multi", "1", index, access=5)
    # Fetched by digest, the platform manifests are held by the repository too.
    c.name("multi", None, amd)
    c.name("multi", None, arm)
    [image] = images(c.snap)
    assert image.digest == index
    # Pulling by tag touches the platform's manifest last: that counts as use of the image.
    assert image.last_access == 50
    [eviction] = plan_eviction(c.snap, c.snap.total, 0)
    assert set(eviction.freed) == {index, amd, arm, d("amd-layer"), d("arm-layer")}
    assert eviction.size == c.snap.total


def test_eviction_goes_lru_first_and_stops_at_the_target() -> None:
    c = Cache()
    old = c.image("old", "1", {"old": 100}, access=1)
    mid = c.image("mid", "1", {"mid": 100}, access=2)
    c.image("new", "1", {"new": 100}, access=3)
    total = c.snap.total
    assert total == 303
    plan = plan_eviction(c.snap, total, target=150)
    assert [e.image.digest for e in plan] == [old, mid]
    assert [e.size for e in plan] == [101, 101]
    assert plan_eviction(c.snap, total, target=total) == []
    assert [e.image.digest for e in plan_eviction(c.snap, total, target=250)] == [old]


def test_pinned_images_are_never_evicted() -> None:
    c = Cache()
    by_tag = c.image("tagpin", "1", {"t": 100}, access=1)
    by_digest = c.image("digestpin", "1", {"dp": 100}, access=2)
    free = c.image("free", "1", {"f": 100}, access=3)
    c.snap.pins = {("r.io", "tagpin", "1"), ("r.io", "digestpin", by_digest)}
    assert c.snap.pinned_digests() == {by_tag, by_digest}
    plan = plan_eviction(c.snap, c.snap.total, target=0)
    assert [e.image.digest for e in plan] == [free]
    assert {i.digest for i in images(c.snap) if i.pinned} == {by_tag, by_digest}


def test_shared_blobs_go_only_with_the_last_image_using_them() -> None:
    c = Cache()
    a = c.image("a", "1", {"base": 1000, "a-top": 10}, access=1)
    b = c.image("b", "1", {"base": 1000, "b-top": 10}, access=2)
    plan = plan_eviction(c.snap, c.snap.total, target=500)
    assert [e.image.digest for e in plan] == [a, b]
    assert set(plan[0].freed) == {a, d("a-top")}  # the base stays for b
    assert set(plan[1].freed) == {b, d("b-top"), d("base")}
    # Enough after a: the shared base is not touched.
    plan = plan_eviction(c.snap, c.snap.total, target=c.snap.total - 11)
    assert [set(e.freed) for e in plan] == [{a, d("a-top")}]


def test_a_pinned_image_keeps_content_it_shares() -> None:
    c = Cache()
    a = c.image("a", "1", {"base": 1000, "a-top": 10}, access=1)
    c.image("b", "1", {"base": 1000, "b-top": 10}, access=2)
    c.snap.pins = {("r.io", "b", "1")}
    [eviction] = plan_eviction(c.snap, c.snap.total, target=0)
    assert eviction.image.digest == a
    assert d("base") not in eviction.freed


def test_images_being_read_are_skipped() -> None:
    c = Cache()
    old = c.image("old", "1", {"old": 100}, access=1)
    new = c.image("new", "1", {"new": 100}, access=2)
    skipped: list[Image] = []
    plan = plan_eviction(c.snap, c.snap.total, target=150, busy={d("old")}, skipped=skipped)
    assert [e.image.digest for e in plan] == [new]
    assert [i.digest for i in skipped] == [old]
    assert old not in {e.image.digest for e in plan}
    # A shared blob being read does not block an image that does not free it.
    c2 = Cache()
    x = c2.image("x", "1", {"shared": 100, "x": 5}, access=1)
    c2.image("y", "1", {"shared": 100, "y": 5}, access=2)
    plan = plan_eviction(c2.snap, c2.snap.total, target=100, busy={d("shared")})
    assert [e.image.digest for e in plan] == [x]


def test_an_image_that_frees_nothing_is_left_alone() -> None:
    c = Cache()
    amd = c.manifest("amd", [c.blob("amd-layer", 100)], access=0)
    index = c.manifest("index", [amd], access=5)
    c.name("multi", "1", index, access=5)
    c.name("amd-only", "v1", amd, access=1)  # a tag on the platform manifest itself
    plan = plan_eviction(c.snap, c.snap.total, target=0)
    # The tag's image is older but everything it has is the index's too: skipped; the index
    # goes first and leaves the platform's content to the tag.
    assert [e.image.digest for e in plan[:1]] == [index]
    assert set(plan[0].freed) == {index}
    assert [e.image.digest for e in plan[1:]] == [amd]


# --- garbage collection ----------------------------------------------------------------------


def test_collection_takes_unreferenced_content_past_its_grace() -> None:
    c = Cache()
    kept = c.image("kept", "1", {"kept-layer": 10}, access=0)
    c.blob("old-orphan", 10, access=100)
    c.blob("young-orphan", 10, access=990)
    c.blob("read-orphan", 10, access=0)
    lost = c.manifest("lost", [c.blob("lost-layer", 10, access=0)], access=0)  # no name
    doomed = plan_collection(c.snap, now=1000, grace=60, busy={d("read-orphan")})
    assert set(doomed) == {d("old-orphan"), lost, d("lost-layer")}
    assert doomed.index(lost) < doomed.index(d("lost-layer"))  # parents first
    assert kept not in doomed and d("kept-layer") not in doomed
    assert plan_collection(c.snap, now=1000, grace=0) == topological(
        {d("old-orphan"), d("young-orphan"), d("read-orphan"), lost, d("lost-layer")},
        c.snap.refs,
    )


def test_collection_keeps_what_pins_hold() -> None:
    c = Cache()
    orphan_manifest = c.manifest("pinned-by-digest", [c.blob("its-layer", 5)], access=0)
    c.snap.pins = {("r.io", "x", orphan_manifest)}
    assert plan_collection(c.snap, now=1e9, grace=0) == []


def test_topological_orders_parents_before_children() -> None:
    refs = {"i": ["m1", "m2"], "m1": ["b1", "shared"], "m2": ["b2", "shared"]}
    order = topological(["shared", "b2", "m2", "b1", "i", "m1"], refs)
    assert sorted(order) == sorted(["shared", "b2", "m2", "b1", "i", "m1"])
    for parent, children in refs.items():
        for child in children:
            assert order.index(parent) < order.index(child)


# --- readers ---------------------------------------------------------------------------------


def test_readers_count_holds() -> None:
    readers = Readers()
    first, second = readers.hold("x"), readers.hold("x")
    assert "x" in readers
    first.release()
    first.release()  # idempotent: does not drop the second reader
    assert "x" in readers
    second.release()
    assert "x" not in readers and readers.busy() == frozenset()


def test_a_hold_is_released_when_its_owner_is_dropped() -> None:
    class Owner:
        pass

    readers = Readers()
    owner = Owner()
    readers.hold("y").tie(owner)
    assert "y" in readers
    del owner
    pygc.collect()
    assert "y" not in readers


# --- the collector on a real index and store ---------------------------------------------------


class RealCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store, self.index = open_index(root)

    def blob(self, content: bytes) -> str:
        digest = Digest.of(content)
        self.store.write(digest, content)
        self.index.add_blob(str(digest), len(content))
        return str(digest)

    def image(self, repo: str, tag: str | None, layers: list[bytes]) -> str:
        refs = [self.blob(layer) for layer in layers]
        body = json.dumps({"schemaVersion": 2, "layers": refs, "repo": repo}).encode()
        digest = Digest.of(body)
        self.store.write(digest, body)
        self.index.add_manifest(
            "r.io", repo, str(digest), "application/json", len(body), [(r, "layer") for r in refs]
        )
        if tag is not None:
            self.index.set_tag("r.io", repo, tag, str(digest))
        return str(digest)

    def age(self, seconds: float) -> None:
        """Make every recorded use ``seconds`` older."""
        for table in ("blobs", "manifests", "tags"):
            self.index.db.execute(f"UPDATE {table} SET last_access = last_access - ?", (seconds,))

    def use(self, repo: str, tag: str) -> None:
        entry = self.index.tag("r.io", repo, tag)
        assert entry is not None
        self.index.manifest(entry.digest)

    def files(self) -> set[str]:
        return {str(digest) for digest, _ in self.store}

    def rows(self) -> set[str]:
        return {
            r[0]
            for r in self.index.db.execute(
                "SELECT digest FROM blobs UNION SELECT digest FROM manifests"
            )
        }

    def collector(self, bounds: Bounds | None, grace: float = 3600.0) -> tuple[Collector, Events]:
        events = Events()
        collector = Collector(
            self.store,
            self.index,
            GCConfig(bounds, 60, grace),
            Readers(),
            Hooks(
                on_run=events.run,
                on_evicted=events.evicted,
                on_reclaimed=events.reclaimed,
                on_size=events.size,
            ),
        )
        assert collector.open()
        return collector, events


class Events:
    def __init__(self) -> None:
        self.runs = 0
        self.evictions = 0
        self.bytes: dict[str, int] = {"evict": 0, "gc": 0}
        self.sizes: list[int] = []

    def run(self) -> None:
        self.runs += 1

    def evicted(self, n: int) -> None:
        self.evictions += n

    def reclaimed(self, reason: str, n: int) -> None:
        self.bytes[reason] += n

    def size(self, n: int) -> None:
        self.sizes.append(n)


LAYER = 10_000


def layer(name: str) -> bytes:
    return name.encode().ljust(LAYER, b".")


async def test_collector_evicts_lru_images_keeping_pinned_and_shared(tmp_path: Path) -> None:
    cache = RealCache(tmp_path)
    images_ = {
        name: cache.image(name, "1", [layer(f"{name}-top"), layer("base")])
        for name in ("a", "b", "c", "d")
    }
    cache.age(100)
    for name in ("c", "a", "b", "d"):  # LRU order now: c, a, b, d
        cache.use(name, "1")
        await asyncio.sleep(0.01)
    pin(cache.index.db, "r.io", "c", "1")  # the least recently used, but pinned
    total = cache.index.total_size()
    # The low watermark is half a layer below the total: one image has to go.
    bounds = Bounds(limit=int((total - LAYER / 2) / 0.8), high=85, low=80)
    assert bounds.over(total)
    collector, events = cache.collector(bounds)
    result = await collector.cycle()

    assert result.evicted == 1 == events.evictions
    left = {r.repository for r in cache.index.images()}
    assert left == {"b", "c", "d"}  # a went; c is pinned though older
    assert images_["a"] not in cache.files()
    assert layer("base") == cache.store.read(Digest.parse(cache.blob(layer("base"))))
    assert cache.index.total_size() <= bounds.low_bytes
    assert events.bytes["evict"] == total - cache.index.total_size() > LAYER
    assert events.runs == 1 and events.sizes == [cache.index.total_size()]
    assert cache.files() == cache.rows()  # the index equals the files
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_collector_skips_a_blob_being_read_and_retries(tmp_path: Path) -> None:
    cache = RealCache(tmp_path)
    old = cache.image("old", "1", [layer("old")])
    cache.age(100)
    cache.image("new", "1", [layer("new")])
    total = cache.index.total_size()
    collector, events = cache.collector(Bounds(int(total * 0.4), 85, 80))  # room for neither
    read = collector.readers.hold(str(Digest.of(layer("old"))))
    first = await collector.cycle()
    assert first.skipped == 1  # counted: the collector looks again soon
    # The old image's layer is being read: the old image stays, the new one goes instead.
    assert old in cache.rows() and Digest.of(layer("old")) in dict(cache.store)
    assert first.evicted == 1
    assert {r.repository for r in cache.index.images()} == {"old"}
    read.release()
    # Still over (a single image left over the limit); once free, it goes too.
    second = await collector.cycle()
    assert second.evicted == 1
    assert cache.index.images() == []
    assert cache.files() == cache.rows() == set()
    assert events.evictions == 2


async def test_collector_leaves_an_image_used_after_the_snapshot(tmp_path: Path) -> None:
    cache = RealCache(tmp_path)
    cache.image("a", "1", [layer("a")])
    cache.age(100)
    collector, _ = cache.collector(Bounds(10, 85, 80))
    snap = read_snapshot(sqlite3.connect(cache.index.path, isolation_level=None))
    [image] = images(snap)
    cache.use("a", "1")  # between the decision and its application
    cache.index.flush()
    assert collector._in_transaction(lambda: collector._evict_rows(image)) is None
    assert {r.repository for r in cache.index.images()} == {"a"}


async def test_collector_collects_only_old_unreferenced_content(tmp_path: Path) -> None:
    cache = RealCache(tmp_path)
    kept = cache.image("kept", "1", [layer("kept")])
    gone = cache.image("gone", "1", [layer("gone")])
    old_orphan = cache.blob(layer("old-orphan"))
    cache.age(100)
    young_orphan = cache.blob(layer("young-orphan"))
    # cache rm of the tag, from the index only (as if its file deletions had not happened).
    cache.index.db.execute("DELETE FROM tags WHERE repository='gone'")
    cache.index.db.execute("DELETE FROM repo_manifests WHERE repository='gone'")
    collector, events = cache.collector(None, grace=50)
    result = await collector.cycle()
    collected = {gone, str(Digest.of(layer("gone"))), old_orphan}
    assert result.collected == 3
    assert not collected & cache.files()
    assert {kept, young_orphan} <= cache.files()
    assert events.bytes["gc"] == LAYER * 2 + len(cache.store.read(Digest.parse(kept)) or b"")
    assert events.evictions == 0
    assert cache.files() == cache.rows()


async def test_unflushed_uses_count(tmp_path: Path) -> None:
    cache = RealCache(tmp_path)
    first = cache.image("first", "1", [layer("first")])
    second = cache.image("second", "1", [layer("second")])
    cache.age(100)
    cache.index.flush()
    cache.use("first", "1")  # only in memory: the collector must flush it first
    total = cache.index.total_size()
    collector, _ = cache.collector(Bounds(int(total * 0.7), 85, 80))
    await collector.cycle()
    assert first in cache.rows()
    assert second not in cache.rows()


def test_pins_on_the_index(tmp_path: Path) -> None:
    cache = RealCache(tmp_path)
    digest = cache.image("app", "1", [layer("app")])
    db: sqlite3.Connection = cache.index.db
    assert pinned_digests(db) == set()  # no pins table yet: nothing pinned
    assert pin(db, "r.io", "app", "1")
    assert not pin(db, "r.io", "app", "1")
    assert pinned_digests(db) == {digest}
    assert unpin(db, "r.io", "app", "1")
    assert not unpin(db, "r.io", "app", "1")
    assert pin(db, "r.io", "app", digest)
    assert pinned_digests(db) == {digest}
    drop_pins(db, "r.io", "app", ["1", None], removed=[digest])
    assert pinned_digests(db) == set()


def test_collector_is_off_without_a_writable_index(tmp_path: Path) -> None:
    store, _ = open_index(tmp_path)
    memory = Index(Path(":memory:"))
    assert not Collector(store, memory, GCConfig(), Readers()).open()
