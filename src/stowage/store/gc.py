"""A bounded cache: least-recently-used images are evicted, unreferenced blobs collected.

An *image* (the unit of eviction) is a manifest some name points at: a tag, or a
repository that holds it by digest. It owns the manifests and blobs reachable from
it that no other image (and no pin) reaches. When the cache grows above the high
watermark of ``--max-size``, images are evicted, least recently used first, until
it is below the low watermark. Pinned images are never evicted.

Garbage collection removes content no name reaches any more (left by ``cache rm``,
adopted at start-up, or a blob fetched by digest whose manifest never came) once
it has not been used for a grace period: a blob fetched moments ago whose
manifest is still on its way is kept.

Nothing here blocks pulls. Decisions are taken on a snapshot of the index read
in a thread; each image is then removed in its own short write transaction that
re-checks, on the event loop, that nothing reached or used it since and that no
client is reading any of its files (those are skipped and retried later). Files
are moved out of ``blobs/`` in the same step (a rename: no reader can open them
afterwards) and deleted in a thread. The cache is never locked read-only.

The decisions (``plan_eviction``, ``plan_collection``, ``parse_size``) are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import re
import secrets
import sqlite3
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from stowage.oci.digest import Digest, InvalidDigest
from stowage.store.blobs import BlobStore, discard
from stowage.store.index import Index

log = structlog.get_logger("stowage.gc")

PIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    ref TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (registry, repository, ref)
);
CREATE INDEX IF NOT EXISTS manifest_refs_child ON manifest_refs(child);
CREATE INDEX IF NOT EXISTS tags_digest ON tags(digest);
CREATE INDEX IF NOT EXISTS repo_manifests_digest ON repo_manifests(digest);
"""

# Still over the high watermark because files were being read: look again soon.
RETRY_DELAY = 2.0
GC_BATCH = 500  # rows per write transaction when collecting
DEFAULT_GRACE = 3600.0

# -- sizes ---------------------------------------------------------------------

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "p": 1000**5}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(i)?)?b?", re.IGNORECASE)
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*%")


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """A cache size: a number of bytes, or a percentage of the filesystem."""

    value: float
    percent: bool = False

    def resolve(self, path: Path) -> int:
        """Bytes allowed for a cache whose data directory is ``path``."""
        if not self.percent:
            return int(self.value)
        st = os.statvfs(path)
        return int(st.f_blocks * st.f_frsize * self.value / 100)

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


def parse_size(text: str | int) -> SizeLimit:
    """``1073741824``, ``50G`` (10^9), ``500MiB`` (2^20), ``1.5Ti``, ``80%``.

    Units are case-insensitive; K/M/G/T/P are powers of 1000 and Ki/Mi/Gi/Ti/Pi
    (with or without a trailing B) powers of 1024, as in Kubernetes quantities.
    Raises ValueError naming what is accepted.
    """
    raw = str(text).strip()
    if match := _PERCENT.fullmatch(raw):
        pct = float(match.group(1))
        if not 0 < pct <= 100:
            raise ValueError(f"{raw!r}: a percentage must be above 0% and at most 100%")
        return SizeLimit(pct, percent=True)
    match = _SIZE.fullmatch(raw)
    if match is None:
        raise ValueError(
            f"{raw!r} is not a size: bytes with an optional unit (1073741824, 50G, 500MiB) "
            "or a percentage of the filesystem (80%)"
        )
    number, prefix, binary = match.groups()
    prefix = (prefix or "").lower()
    unit = 1024 ** list(_UNITS).index(prefix) if binary else _UNITS[prefix]
    size = float(number) * unit
    if size < 1:
        raise ValueError(f"{raw!r}: the size must be at least one byte")
    return SizeLimit(float(math.floor(size)))


@dataclass(frozen=True, slots=True)
class Bounds:
    """``limit`` bytes with watermarks in percent of it."""

    limit: int
    high: float = 85.0
    low: float = 80.0

    @property
    def high_bytes(self) -> int:
        return int(self.limit * self.high / 100)

    @property
    def low_bytes(self) -> int:
        return int(self.limit * self.low / 100)

    def over(self, size: int) -> bool:
        return size > self.high_bytes


# -- the index as a graph ------------------------------------------------------

Name = tuple[str, str, str | None]  # registry, repository, tag (None: held by digest)


@dataclass(slots=True)
class Snapshot:
    """What the policy needs from the index, read in one transaction."""

    sizes: dict[str, int] = field(default_factory=dict)  # every manifest and blob row
    access: dict[str, float] = field(default_factory=dict)  # digest -> last access
    manifests: set[str] = field(default_factory=set)
    refs: dict[str, list[str]] = field(default_factory=dict)  # manifest -> its references
    tags: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    repo_manifests: list[tuple[str, str, str]] = field(default_factory=list)
    pins: set[tuple[str, str, str]] = field(default_factory=set)  # registry, repo, tag|digest

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def reach(self, digest: str) -> set[str]:
        """``digest`` and everything it references, transitively (rows that exist)."""
        seen: set[str] = set()
        stack = [digest]
        while stack:
            d = stack.pop()
            if d in seen or d not in self.sizes:
                continue
            seen.add(d)
            stack.extend(self.refs.get(d, ()))
        return seen

    def children(self) -> set[str]:
        """Digests some cached manifest references."""
        return {c for parent, cs in self.refs.items() if parent in self.manifests for c in cs}

    def pinned_digests(self) -> set[str]:
        """What the pins keep: a pinned tag's current manifest, a pinned digest."""
        tag_digest = {(r, repo, t): d for r, repo, t, d, _ in self.tags}
        out: set[str] = set()
        for registry, repository, ref in self.pins:
            digest = ref if ":" in ref else tag_digest.get((registry, repository, ref))
            if digest is not None and digest in self.manifests:
                out.add(digest)
        return out


@dataclass(frozen=True, slots=True)
class Image:
    """A unit of eviction: a manifest and every name pointing at it."""

    digest: str
    names: tuple[Name, ...]
    last_access: float
    pinned: bool = False

    def __str__(self) -> str:
        if not self.names:
            return self.digest
        registry, repository, tag = self.names[0]
        return f"{registry}/{repository}" + (f":{tag}" if tag else f"@{self.digest}")


def images(snap: Snapshot) -> list[Image]:
    """Every image, least recently used first.

    A manifest held by digest only because it belongs to a cached index (a
    platform's manifest) is part of that index's image, not an image of its own.
    Last use is the latest access of its names, its manifest and the manifests
    it references (a pull by tag touches the index, then the platform's manifest).
    """
    children = snap.children()
    names: dict[str, list[Name]] = {}
    access: dict[str, float] = {}
    for registry, repository, tag, digest, when in snap.tags:
        if digest in snap.manifests:
            names.setdefault(digest, []).append((registry, repository, tag))
            access[digest] = max(access.get(digest, 0.0), when)
    for registry, repository, digest in snap.repo_manifests:
        if digest in snap.manifests and digest not in children:
            names.setdefault(digest, []).append((registry, repository, None))
    pinned = snap.pinned_digests()
    out = []
    for digest, held in names.items():
        used = max(
            [access.get(digest, 0.0)]
            + [snap.access.get(d, 0.0) for d in snap.reach(digest) if d in snap.manifests]
        )
        out.append(Image(digest, tuple(sorted(held, key=_name_key)), used, digest in pinned))
    out.sort(key=lambda i: (i.last_access, i.digest))
    return out


def _name_key(name: Name) -> tuple[bool, str, str, str]:
    return name[2] is None, name[0], name[1], name[2] or ""  # tags first


@dataclass(frozen=True, slots=True)
class Eviction:
    image: Image
    freed: tuple[str, ...]  # digests no other image or pin reaches
    size: int


def plan_eviction(
    snap: Snapshot,
    total: int,
    target: int,
    busy: Collection[str] = (),
    skipped: list[Image] | None = None,
) -> list[Eviction]:
    """Images to evict, least recently used first, until ``total`` <= ``target``.

    An image is skipped when pinned, when it frees nothing (everything it has is
    also another image's), or when a file it would free is being read (``busy``).
    Content shared with an image that stays is never freed; once every image
    sharing it is evicted, the last one frees it. Images skipped because they
    are being read are appended to ``skipped``.
    """
    if total <= target:
        return []
    candidates = images(snap)
    holders: dict[str, int] = {}
    reaches: dict[str, set[str]] = {}
    for image in candidates:
        reaches[image.digest] = snap.reach(image.digest)
        for d in reaches[image.digest]:
            holders[d] = holders.get(d, 0) + 1
    for digest in snap.pinned_digests():
        for d in snap.reach(digest):  # e.g. a pinned platform manifest of an index
            holders[d] = holders.get(d, 0) + 1
    plan: list[Eviction] = []

    def evict(image: Image) -> bool | None:
        """Plan ``image``'s eviction; None if it frees nothing (yet)."""
        nonlocal total
        reach = reaches[image.digest]
        freed = sorted(d for d in reach if holders[d] == 1)
        if not freed:
            return None
        if any(d in busy for d in freed):
            if skipped is not None:
                skipped.append(image)
            return False
        for d in reach:
            holders[d] -= 1
        size = sum(snap.sizes[d] for d in freed)
        plan.append(Eviction(image, tuple(freed), size))
        total -= size
        return True

    waiting: list[Image] = []  # older images whose content another image still had
    for image in candidates:
        if total <= target:
            break
        if image.pinned:
            continue
        outcome = evict(image)
        if outcome is None:
            waiting.append(image)
        elif outcome:
            waiting = [w for w in waiting if total <= target or evict(w) is None]
    return plan


def plan_collection(
    snap: Snapshot, now: float, grace: float, busy: Collection[str] = ()
) -> list[str]:
    """Content no name or pin reaches, unused for ``grace`` seconds, parents first."""
    roots = {d for *_, d, _ in snap.tags}
    roots.update(d for *_, d in snap.repo_manifests)
    roots.update(snap.pinned_digests())
    live: set[str] = set()
    for root in roots:
        if root not in live:
            live |= snap.reach(root)
    dead = [
        d
        for d in snap.sizes
        if d not in live and snap.access.get(d, 0.0) <= now - grace and d not in busy
    ]
    return topological(dead, snap.refs)


def topological(digests: Iterable[str], refs: dict[str, list[str]]) -> list[str]:
    """``digests`` ordered so that a manifest comes before what it references."""
    wanted = set(digests)
    order: list[str] = []
    done: set[str] = set()
    for start in sorted(wanted):
        if start in done:
            continue
        # Iterative depth-first post-order; reversed at the end.
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(refs.get(start, ())))]
        done.add(start)
        while stack:
            node, it = stack[-1]
            child = next((c for c in it if c in wanted and c not in done), None)
            if child is None:
                stack.pop()
                order.append(node)
            else:
                done.add(child)
                stack.append((child, iter(refs.get(child, ()))))
    order.reverse()
    return order


def read_snapshot(db: sqlite3.Connection) -> Snapshot:
    snap = Snapshot()
    db.execute("BEGIN")
    try:
        for digest, size, when in db.execute("SELECT digest, size, last_access FROM blobs"):
            snap.sizes[digest] = size
            snap.access[digest] = when
        for digest, size, when in db.execute("SELECT digest, size, last_access FROM manifests"):
            snap.sizes[digest] = size
            snap.access[digest] = when
            snap.manifests.add(digest)
        for parent, child in db.execute("SELECT parent, child FROM manifest_refs"):
            snap.refs.setdefault(parent, []).append(child)
        snap.tags = db.execute(
            "SELECT registry, repository, tag, digest, last_access FROM tags"
        ).fetchall()
        snap.repo_manifests = db.execute(
            "SELECT registry, repository, digest FROM repo_manifests"
        ).fetchall()
        snap.pins = set(db.execute("SELECT registry, repository, ref FROM pins").fetchall())
    finally:
        db.execute("COMMIT")
    return snap


# -- pins (also used by the CLI on the data directory) --------------------------


def ensure_schema(db: sqlite3.Connection) -> None:
    db.executescript(PIN_SCHEMA)


def pin(db: sqlite3.Connection, registry: str, repository: str, ref: str) -> bool:
    """Pin a tag or digest of a repository; False if it was pinned already."""
    ensure_schema(db)
    cur = db.execute(
        "INSERT OR IGNORE INTO pins VALUES (?,?,?,?)", (registry, repository, ref, time.time())
    )
    return cur.rowcount > 0


def unpin(db: sqlite3.Connection, registry: str, repository: str, ref: str) -> bool:
    """Remove a pin; False if there was none."""
    ensure_schema(db)
    cur = db.execute(
        "DELETE FROM pins WHERE registry=? AND repository=? AND ref=?",
        (registry, repository, ref),
    )
    return cur.rowcount > 0


def drop_pins(
    db: sqlite3.Connection,
    registry: str,
    repository: str,
    refs: Iterable[str | None],
    removed: Iterable[str] = (),
) -> None:
    """Forget the pins of a removed image (``cache rm``): its tag or digest in the
    repository, and any pin of content that is gone."""
    try:
        db.executemany(
            "DELETE FROM pins WHERE registry=? AND repository=? AND ref=?",
            [(registry, repository, ref) for ref in refs if ref],
        )
        db.executemany("DELETE FROM pins WHERE ref=?", [(d,) for d in removed])
    except sqlite3.OperationalError:  # no pins table: nothing was ever pinned
        pass


def pinned_digests(db: sqlite3.Connection) -> set[str]:
    """Manifest digests kept by pins (for listings; works on a read-only index)."""
    try:
        rows = db.execute(
            "SELECT p.ref FROM pins p WHERE p.ref LIKE '%:%' "
            "UNION SELECT t.digest FROM pins p JOIN tags t ON t.registry = p.registry "
            "AND t.repository = p.repository AND t.tag = p.ref"
        ).fetchall()
    except sqlite3.OperationalError:  # no pins table: nothing was ever pinned
        return set()
    return {row[0] for row in rows}


# -- readers -------------------------------------------------------------------


class Readers:
    """Open readers per digest: a file being served is never deleted."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}

    def hold(self, digest: str) -> Hold:
        self._count[digest] = self._count.get(digest, 0) + 1
        return Hold(self, digest)

    def _release(self, digest: str) -> None:
        left = self._count.get(digest, 0) - 1
        if left > 0:
            self._count[digest] = left
        else:
            self._count.pop(digest, None)

    def __contains__(self, digest: object) -> bool:
        return digest in self._count

    def busy(self) -> frozenset[str]:
        return frozenset(self._count)


class Hold:
    """One reader of a digest; ``release`` is idempotent and also happens when
    the holder (e.g. a response that was never sent) is garbage-collected."""

    __slots__ = ("_digest", "_readers")

    def __init__(self, readers: Readers, digest: str) -> None:
        self._readers: Readers | None = readers
        self._digest = digest

    def release(self) -> None:
        readers, self._readers = self._readers, None
        if readers is not None:
            readers._release(self._digest)

    def tie(self, owner: object) -> None:
        """Release when ``owner`` is garbage-collected, at the latest."""
        weakref.finalize(owner, self.release)


# -- the background collector ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class GCConfig:
    bounds: Bounds | None = None  # None: no size limit (only garbage collection)
    interval: float = 60.0
    grace: float = DEFAULT_GRACE


@dataclass(slots=True)
class Hooks:
    """Where the collector reports (metrics)."""

    on_run: Callable[[], None] = lambda: None
    on_evicted: Callable[[int], None] = lambda n: None
    on_reclaimed: Callable[[str, int], None] = lambda reason, n: None
    on_size: Callable[[int], None] = lambda n: None


class _Abort(Exception):
    """An image cannot be removed now (a reader, or it was used since)."""


@dataclass(slots=True)
class CycleResult:
    collected: int = 0
    evicted: int = 0
    reclaimed: dict[str, int] = field(default_factory=lambda: {"gc": 0, "evict": 0})
    skipped: int = 0  # images left because they were being read or used meanwhile
    size: int = 0


class Collector:
    """Runs garbage collection every ``interval`` seconds and evicts when the cache
    is over the high watermark, also right after a fill pushed it over."""

    def __init__(
        self,
        store: BlobStore,
        index: Index,
        config: GCConfig,
        readers: Readers,
        hooks: Hooks | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.config = config
        self.readers = readers
        self.hooks = hooks or Hooks()
        self._db: sqlite3.Connection | None = None
        self._wake = asyncio.Event()
        self._size = 0  # running estimate between cycles
        self._retry = False
        self._warned = False

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> bool:
        """Connect to the index; False (collector off) when it is not writable."""
        if str(self.index.path) == ":memory:":
            return False
        try:
            db = sqlite3.connect(self.index.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=1000")
            ensure_schema(db)
        except sqlite3.Error as exc:
            log.warning("garbage collection off: index not writable", error=str(exc))
            return False
        self._db = db
        self._size = self.index.total_size()
        return True

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def poke(self, added: int = 0) -> None:
        """Content was added: evict now if that went over the high watermark."""
        self._size += added
        bounds = self.config.bounds
        if bounds is not None and bounds.over(self._size):
            self._wake.set()

    async def run(self) -> None:
        """The background task: a cycle at start, then every interval or when poked."""
        while True:
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a bad cycle stop the collector
                log.exception("garbage collection failed", error=repr(exc))
            delay = min(self.config.interval, RETRY_DELAY) if self._retry else self.config.interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()

    # -- one cycle -----------------------------------------------------------

    async def cycle(self) -> CycleResult:
        result = CycleResult()
        if self._db is None:
            return result
        self.hooks.on_run()
        self.index.flush()  # access times not yet written count too
        path = self.index.path
        snap = await asyncio.to_thread(_snapshot_at, path)
        busy = self.readers.busy()
        doomed = plan_collection(snap, time.time(), self.config.grace, busy)
        if doomed:
            await self._collect(doomed, result)
        bounds = self.config.bounds
        total = snap.total - result.reclaimed["gc"]
        self._retry = False
        if bounds is not None and bounds.over(total):
            in_use: list[Image] = []
            plan = plan_eviction(snap, total, bounds.low_bytes, busy, in_use)
            result.skipped += len(in_use)
            await self._evict(plan, bounds, result)
        result.size = self.index.total_size()
        self._size = result.size
        self.hooks.on_size(result.size)
        over = bounds is not None and bounds.over(result.size)
        if over and bounds is not None:
            self._retry = result.skipped > 0  # readers finish: look again soon
            if not self._warned:  # once per episode, not every retry
                log.warning(
                    "cache still above its high watermark (pinned, in use or recent content)",
                    size=result.size,
                    high=bounds.high_bytes,
                    skipped=result.skipped,
                )
        self._warned = over
        return result

    async def _collect(self, doomed: list[str], result: CycleResult) -> None:
        cutoff = time.time() - self.config.grace
        for start in range(0, len(doomed), GC_BATCH):
            batch = doomed[start : start + GC_BATCH]
            removed = self._in_transaction(functools.partial(self._collect_rows, batch, cutoff))
            if removed is None:
                continue
            size = await self._delete_files(removed)
            result.collected += len(removed)
            result.reclaimed["gc"] += size
            self.hooks.on_reclaimed("gc", size)
        if result.collected:
            log.info(
                "garbage collected",
                files=result.collected,
                reclaimed=result.reclaimed["gc"],
            )

    def _collect_rows(self, batch: list[str], cutoff: float) -> list[tuple[str, int]]:
        removed: list[tuple[str, int]] = []
        for digest in batch:
            if digest in self.readers or self._named(digest) or self._referenced(digest):
                continue
            row = self._row(digest)
            if row is None or row[1] > cutoff:
                continue
            self._delete_rows(digest)
            removed.append((digest, row[0]))
        return removed

    async def _evict(self, plan: list[Eviction], bounds: Bounds, result: CycleResult) -> None:
        self.index.flush()  # uses since the snapshot must count
        total = self.index.total_size()
        for eviction in plan:
            if total <= bounds.low_bytes:
                break
            image = eviction.image
            try:
                removed = self._in_transaction(
                    functools.partial(self._evict_rows, image), abort=True
                )
            except _Abort as exc:
                log.info("eviction skipped", image=str(image), reason=str(exc))
                result.skipped += 1
                continue
            if removed is None:
                continue
            size = await self._delete_files(removed)
            total -= size
            result.evicted += 1
            result.reclaimed["evict"] += size
            self.hooks.on_evicted(1)
            self.hooks.on_reclaimed("evict", size)
            log.info(
                "evicted",
                image=str(image),
                digest=image.digest,
                names=len(image.names),
                files=len(removed),
                reclaimed=size,
                last_used=round(image.last_access, 3),
            )

    def _evict_rows(self, image: Image) -> list[tuple[str, int]]:
        """Remove an image's names and the content nothing else reaches any more."""
        assert self._db is not None
        db = self._db
        if self._pinned(image.digest):
            raise _Abort("pinned")
        used = db.execute(
            "SELECT max(last_access) FROM tags WHERE digest=?", (image.digest,)
        ).fetchone()[0]
        if used is not None and used > image.last_access:
            raise _Abort("used since the decision")
        db.execute("DELETE FROM tags WHERE digest=?", (image.digest,))
        db.execute("DELETE FROM repo_manifests WHERE digest=?", (image.digest,))
        removed: list[tuple[str, int]] = []
        deleted: set[str] = set()
        queue = deque([image.digest])
        while queue:
            digest = queue.popleft()
            if digest in deleted or self._referenced(digest):
                continue
            # A platform's manifest is held by digest as part of its index: those
            # names go with it. Tags and pins are names of their own and keep it.
            if digest != image.digest and (self._tagged(digest) or self._pinned(digest)):
                continue
            row = self._row(digest)
            if row is None:
                continue
            if digest in self.readers:
                raise _Abort(f"{digest} is being read")
            if self._is_manifest(digest) and row[1] > image.last_access:
                raise _Abort("used since the decision")
            children = [
                r[0]
                for r in db.execute("SELECT child FROM manifest_refs WHERE parent=?", (digest,))
            ]
            self._delete_rows(digest)
            deleted.add(digest)
            removed.append((digest, row[0]))
            queue.extend(children)
        return removed

    # -- SQL helpers (on the event loop, inside a short transaction) -----------

    def _in_transaction(
        self, work: Callable[[], list[tuple[str, int]]], abort: bool = False
    ) -> list[tuple[str, int]] | None:
        assert self._db is not None
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            log.warning("garbage collection postponed: index busy", error=str(exc))
            return None
        try:
            removed = work()
            if not removed:
                db.execute("ROLLBACK")
                return None
            db.execute("COMMIT")
        except _Abort:
            db.execute("ROLLBACK")
            if abort:
                raise
            return None
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            log.warning("garbage collection write failed", error=str(exc))
            return None
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return removed

    def _row(self, digest: str) -> tuple[int, float] | None:
        assert self._db is not None
        row = self._db.execute(
            "SELECT size, last_access FROM manifests WHERE digest=? "
            "UNION ALL SELECT size, last_access FROM blobs WHERE digest=?",
            (digest, digest),
        ).fetchone()
        return None if row is None else (int(row[0]), float(row[1]))

    def _is_manifest(self, digest: str) -> bool:
        assert self._db is not None
        return (
            self._db.execute("SELECT 1 FROM manifests WHERE digest=?", (digest,)).fetchone()
            is not None
        )

    def _referenced(self, digest: str) -> bool:
        """Whether a cached manifest references ``digest``."""
        assert self._db is not None
        return (
            self._db.execute(
                "SELECT 1 FROM manifest_refs r JOIN manifests m ON m.digest = r.parent "
                "WHERE r.child=? LIMIT 1",
                (digest,),
            ).fetchone()
            is not None
        )

    def _tagged(self, digest: str) -> bool:
        assert self._db is not None
        return (
            self._db.execute("SELECT 1 FROM tags WHERE digest=? LIMIT 1", (digest,)).fetchone()
            is not None
        )

    def _named(self, digest: str) -> bool:
        """A tag, a repository or a pin holds ``digest``."""
        assert self._db is not None
        return (
            self._tagged(digest)
            or self._pinned(digest)
            or (
                self._db.execute(
                    "SELECT 1 FROM repo_manifests WHERE digest=? LIMIT 1", (digest,)
                ).fetchone()
                is not None
            )
        )

    def _pinned(self, digest: str) -> bool:
        assert self._db is not None
        row = self._db.execute(
            "SELECT 1 FROM pins p WHERE p.ref=? OR EXISTS (SELECT 1 FROM tags t "
            "WHERE t.registry=p.registry AND t.repository=p.repository AND t.tag=p.ref "
            "AND t.digest=?) LIMIT 1",
            (digest, digest),
        ).fetchone()
        return row is not None

    def _delete_rows(self, digest: str) -> None:
        assert self._db is not None
        for table, column in (
            ("blobs", "digest"),
            ("manifests", "digest"),
            ("manifest_refs", "parent"),
            ("repo_manifests", "digest"),
        ):
            self._db.execute(f"DELETE FROM {table} WHERE {column}=?", (digest,))

    async def _delete_files(self, removed: list[tuple[str, int]]) -> int:
        """Move the files out of ``blobs/`` now (no reader can open them after
        this), delete them in a thread. Returns the bytes reclaimed."""
        moved: list[Path] = []
        for digest, _ in removed:
            try:
                source = self.store.path(Digest.parse(digest))
            except InvalidDigest:
                continue
            target = self.store.tmp / f"gc-{secrets.token_hex(8)}"
            try:
                os.replace(source, target)
                moved.append(target)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove cached file", digest=digest, error=str(exc))
        if moved:
            await asyncio.to_thread(_unlink_all, moved)
        return sum(size for _, size in removed)


def _snapshot_at(path: Path) -> Snapshot:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        return read_snapshot(db)
    finally:
        db.close()


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        discard(path)
