"""Metadata index in an embedded SQLite database.

Files are the truth for content; the index records what they are (manifests,
their media types and references), which tags point where and when they were
last validated, and usage. Rows are written only after their file is in place,
and start-up reconciliation drops rows whose file is gone, so an index entry
never exists without its file.

Hot lookups (tag -> digest, manifest metadata) are answered from memory; the
memory copy is dropped whenever another process (``stowage cache rm``) commits
to the database, which SQLite reports through ``PRAGMA data_version``.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import structlog

from stowage.store.blobs import BlobStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifest_refs (
    parent TEXT NOT NULL,
    child TEXT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (parent, child)
);
CREATE TABLE IF NOT EXISTS repo_manifests (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (registry, repository, digest)
);
CREATE TABLE IF NOT EXISTS tags (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    validated REAL NOT NULL,
    last_access REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag)
);
CREATE TABLE IF NOT EXISTS stats (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Private images: whether a repository needed credentials upstream, when that
-- was decided, and how ('probe': asked upstream anonymously; 'anonymous':
-- stowage had no credentials for the registry, so all it fetched was public).
CREATE TABLE IF NOT EXISTS repo_access (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    private INTEGER NOT NULL,
    basis TEXT NOT NULL,
    decided REAL NOT NULL,
    PRIMARY KEY (registry, repository)
);
CREATE INDEX IF NOT EXISTS manifest_refs_child ON manifest_refs (child);
CREATE INDEX IF NOT EXISTS repo_manifests_digest ON repo_manifests (digest);
"""

log = structlog.get_logger("stowage.index")
P = ParamSpec("P")
R = TypeVar("R")


def tolerant(method: Callable[P, R]) -> Callable[P, R | None]:
    """A failed index write (disk full, read-only) is logged, never fatal:
    the content is still served; it is only not remembered."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            log.warning("index write failed", operation=method.__name__, error=str(exc))
            return None

    return wrapper


STAT_NAMES = ("hits", "misses", "stale", "errors", "bytes_from_cache", "bytes_from_upstream")


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    validated: float


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class RepoAccess:
    private: bool
    basis: str  # "probe" or "anonymous" (see the repo_access table)
    decided: float  # time.time()


@dataclass(frozen=True, slots=True)
class ImageRow:
    registry: str
    repository: str
    tag: str | None
    digest: str
    media_type: str
    size: int
    last_access: float


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crash of the process loses nothing committed; only
        # power loss can drop the last commits, never corrupt the file.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self._tags: dict[tuple[str, str, str], TagEntry] = {}
        self._manifests: dict[str, ManifestEntry] = {}
        self._access: dict[tuple[str, str], float] = {}
        self._tag_access: dict[tuple[str, str, str], float] = {}
        self._stats: dict[str, int] = {}
        self._version = self._data_version()

    def close(self) -> None:
        self.flush()
        self.db.close()

    def _copy_from(self, uri: str) -> None:
        src = sqlite3.connect(uri, uri=True)
        try:
            src.backup(self.db)
        finally:
            src.close()

    def load_read_only(self, path: Path) -> None:
        """Fill this (in-memory) index with a copy of the index at ``path``, opened
        read-only: a cache on a read-only disk still serves what it holds, and what
        happens meanwhile is remembered until the process ends, never written."""
        if not path.is_file():
            raise sqlite3.OperationalError(f"no index at {path}")
        uri = path.absolute().as_uri()
        try:
            # Sees the WAL's commits, but needs its -shm file to be there already.
            self._copy_from(f"{uri}?mode=ro")
        except sqlite3.Error:
            # Without one (a clean shutdown removes it), only immutable opens work.
            self._copy_from(f"{uri}?immutable=1")
        self.db.executescript(SCHEMA)  # an index from an older version gains new tables
        self._invalidate()

    # -- freshness of the in-memory copy -------------------------------------

    def _data_version(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def _sync(self) -> None:
        """Drop the in-memory copy if another connection (the CLI, the collector) committed
        since the last look. Our own commits leave data_version alone, so this is also
        right after a write; reading the version then instead would hide a commit made
        by someone else just before ours."""
        version = self._data_version()
        if version != self._version:
            self._version = version
            self._tags.clear()
            self._manifests.clear()

    # -- tags ----------------------------------------------------------------

    def tag(self, registry: str, repository: str, tag: str) -> TagEntry | None:
        self._sync()
        key = (registry, repository, tag)
        entry = self._tags.get(key)
        if entry is None:
            row = self.db.execute(
                "SELECT digest, validated FROM tags WHERE registry=? AND repository=? AND tag=?",
                key,
            ).fetchone()
            if row is None:
                return None
            entry = self._tags[key] = TagEntry(row[0], row[1])
        self._tag_access[key] = time.time()
        return entry

    @tolerant
    def set_tag(self, registry: str, repository: str, tag: str, digest: str) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO tags VALUES (?,?,?,?,?,?) ON CONFLICT(registry, repository, tag) "
            "DO UPDATE SET digest=excluded.digest, validated=excluded.validated, "
            "last_access=excluded.last_access",
            (registry, repository, tag, digest, now, now),
        )
        self._sync()
        self._tags[(registry, repository, tag)] = TagEntry(digest, now)

    def tags_of(self, registry: str, repository: str) -> list[str]:
        rows = self.db.execute(
            "SELECT tag FROM tags WHERE registry=? AND repository=? ORDER BY tag",
            (registry, repository),
        )
        return [row[0] for row in rows]

    # -- manifests -----------------------------------------------------------

    def manifest(self, digest: str) -> ManifestEntry | None:
        self._sync()
        entry = self._manifests.get(digest)
        if entry is None:
            row = self.db.execute(
                "SELECT media_type, size FROM manifests WHERE digest=?", (digest,)
            ).fetchone()
            if row is None:
                return None
            entry = self._manifests[digest] = ManifestEntry(digest, row[0], row[1])
        self._access[("manifests", digest)] = time.time()
        return entry

    @tolerant
    def add_manifest(
        self,
        registry: str,
        repository: str,
        digest: str,
        media_type: str,
        size: int,
        refs: Iterable[tuple[str, str]],
    ) -> None:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO manifests VALUES (?,?,?,?,?) ON CONFLICT(digest) DO UPDATE "
                "SET last_access=excluded.last_access",
                (digest, media_type, size, now, now),
            )
            self.db.executemany(
                "INSERT OR IGNORE INTO manifest_refs VALUES (?,?,?)",
                [(digest, child, kind) for child, kind in refs],
            )
            self.db.execute(
                "INSERT OR IGNORE INTO repo_manifests VALUES (?,?,?)",
                (registry, repository, digest),
            )
        self._sync()
        self._manifests[digest] = ManifestEntry(digest, media_type, size)

    # -- blobs ---------------------------------------------------------------

    @tolerant
    def add_blob(self, digest: str, size: int) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO blobs VALUES (?,?,?,?) ON CONFLICT(digest) DO UPDATE "
            "SET last_access=excluded.last_access",
            (digest, size, now, now),
        )
        self._sync()

    def touch_blob(self, digest: str) -> None:
        self._access[("blobs", digest)] = time.time()

    # -- counters ------------------------------------------------------------

    def bump(self, name: str, amount: int = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + amount

    @tolerant
    def flush(self) -> None:
        """Write batched access times and counters (called periodically)."""
        if not (self._access or self._tag_access or self._stats):
            return
        access, self._access = self._access, {}
        tag_access, self._tag_access = self._tag_access, {}
        stats, self._stats = self._stats, {}
        with self.db:
            self.db.execute("BEGIN")
            for (table, digest), when in access.items():
                self.db.execute(
                    f"UPDATE {table} SET last_access=max(last_access, ?) WHERE digest=?",
                    (when, digest),
                )
            self.db.executemany(
                "UPDATE tags SET last_access=max(last_access, ?) "
                "WHERE registry=? AND repository=? AND tag=?",
                [(when, *key) for key, when in tag_access.items()],
            )
            self.db.executemany(
                "INSERT INTO stats VALUES (?, ?) ON CONFLICT(name) "
                "DO UPDATE SET value = value + excluded.value",
                list(stats.items()),
            )
        self._sync()

    def stats(self) -> dict[str, int]:
        values = dict.fromkeys(STAT_NAMES, 0)
        values.update(dict(self.db.execute("SELECT name, value FROM stats").fetchall()))
        for name, amount in self._stats.items():
            values[name] = values.get(name, 0) + amount
        return values

    def total_size(self) -> int:
        row = self.db.execute(
            "SELECT (SELECT coalesce(sum(size), 0) FROM blobs) + "
            "(SELECT coalesce(sum(size), 0) FROM manifests)"
        ).fetchone()
        return int(row[0])

    # -- repository access (private images) ---------------------------------

    def repo_access(self, registry: str, repository: str) -> RepoAccess | None:
        row = self.db.execute(
            "SELECT private, basis, decided FROM repo_access WHERE registry=? AND repository=?",
            (registry, repository),
        ).fetchone()
        return None if row is None else RepoAccess(bool(row[0]), row[1], row[2])

    @tolerant
    def set_repo_access(self, registry: str, repository: str, access: RepoAccess) -> None:
        self.db.execute(
            "INSERT INTO repo_access VALUES (?,?,?,?,?) ON CONFLICT(registry, repository) "
            "DO UPDATE SET private=excluded.private, basis=excluded.basis, "
            "decided=excluded.decided",
            (registry, repository, int(access.private), access.basis, access.decided),
        )
        self._sync()

    def has_repository(self, registry: str, repository: str) -> bool:
        """Whether the index holds any manifest of the repository."""
        row = self.db.execute(
            "SELECT 1 FROM repo_manifests WHERE registry=? AND repository=? LIMIT 1",
            (registry, repository),
        ).fetchone()
        return row is not None

    def any_private(self) -> bool:
        row = self.db.execute("SELECT 1 FROM repo_access WHERE private=1 LIMIT 1").fetchone()
        return row is not None

    def held_by(self, digest: str, private: bool) -> bool:
        """Whether a repository of that kind holds the manifest ``digest``, or a
        manifest it holds references ``digest`` (a blob or an index's child)."""
        row = self.db.execute(
            "SELECT 1 FROM repo_manifests rm JOIN repo_access a "
            "ON a.registry = rm.registry AND a.repository = rm.repository "
            "WHERE a.private = ? AND rm.digest IN "
            "(SELECT ? UNION SELECT parent FROM manifest_refs WHERE child = ?) LIMIT 1",
            (int(private), digest, digest),
        ).fetchone()
        return row is not None

    # -- listing and removal -------------------------------------------------

    def images(self) -> list[ImageRow]:
        """Tagged images plus manifests cached only by digest."""
        rows = self.db.execute(
            """
            SELECT t.registry, t.repository, t.tag, t.digest, m.media_type,
                   m.size + coalesce((SELECT sum(b.size) FROM manifest_refs r
                                      JOIN blobs b ON b.digest = r.child
                                      WHERE r.parent = t.digest), 0),
                   max(t.last_access, m.last_access)
            FROM tags t JOIN manifests m ON m.digest = t.digest
            UNION ALL
            SELECT rm.registry, rm.repository, NULL, rm.digest, m.media_type,
                   m.size + coalesce((SELECT sum(b.size) FROM manifest_refs r
                                      JOIN blobs b ON b.digest = r.child
                                      WHERE r.parent = rm.digest), 0),
                   m.last_access
            FROM repo_manifests rm JOIN manifests m ON m.digest = rm.digest
            WHERE NOT EXISTS (SELECT 1 FROM tags t WHERE t.digest = rm.digest
                              AND t.registry = rm.registry AND t.repository = rm.repository)
              -- a platform's manifest is listed under its index, not on its own
              AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.child = rm.digest)
            ORDER BY 1, 2, 3
            """
        ).fetchall()
        return [ImageRow(*row) for row in rows]

    def holds(self, registry: str, repository: str, tag: str | None, digest: str | None) -> bool:
        """Whether the index knows this tag or manifest of the repository."""
        if tag is not None and self.tag(registry, repository, tag) is not None:
            return True
        row = self.db.execute(
            "SELECT 1 FROM repo_manifests WHERE registry=? AND repository=? AND digest=?",
            (registry, repository, digest),
        ).fetchone()
        return digest is not None and row is not None

    def remove_image(
        self, registry: str, repository: str, tag: str | None, digest: str | None
    ) -> list[str]:
        """Forget an image; return digests whose files are no longer referenced.

        Removing a tag drops the tag; removing a digest also drops the manifest
        from the repository. Manifests, and the blobs they reference, that no
        repository or tag holds any more are deleted from the index and
        returned so the caller can delete their files.
        """
        with self.db:
            self.db.execute("BEGIN")
            self._forget(registry, repository, tag, digest)
            removed = self._collect_unreferenced()
        self._invalidate()
        return removed

    def release(self, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
        """Drop the names of an image (as remove_image does) but keep its rows: online
        garbage collection deletes what no name reaches any more once it has been unused
        for the grace period, minding readers, as for any other unreferenced content."""
        with self.db:
            self.db.execute("BEGIN")
            self._forget(registry, repository, tag, digest)
        self._invalidate()

    def _forget(self, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
        roots: set[str] = set()
        if tag is not None:
            row = self.db.execute(
                "SELECT digest FROM tags WHERE registry=? AND repository=? AND tag=?",
                (registry, repository, tag),
            ).fetchone()
            if row:
                roots.add(row[0])
            self.db.execute(
                "DELETE FROM tags WHERE registry=? AND repository=? AND tag=?",
                (registry, repository, tag),
            )
        if digest is not None:
            roots.add(digest)
            self.db.execute(
                "DELETE FROM tags WHERE registry=? AND repository=? AND digest=?",
                (registry, repository, digest),
            )
        for root in roots:
            still_tagged = self.db.execute(
                "SELECT 1 FROM tags WHERE registry=? AND repository=? AND digest=?",
                (registry, repository, root),
            ).fetchone()
            if not still_tagged:
                self.db.execute(
                    "DELETE FROM repo_manifests WHERE registry=? AND repository=? AND digest=?",
                    (registry, repository, root),
                )

    def _invalidate(self) -> None:
        self._tags.clear()
        self._manifests.clear()
        self._version = self._data_version()

    def _collect_unreferenced(self) -> list[str]:
        """Delete rows no root reaches any more; return their digests."""
        live = {
            row[0]
            for row in self.db.execute(
                "SELECT digest FROM repo_manifests UNION SELECT digest FROM tags"
            )
        }
        frontier = list(live)
        while frontier:
            placeholders = ",".join("?" * len(frontier))
            children = [
                row[0]
                for row in self.db.execute(
                    f"SELECT child FROM manifest_refs WHERE parent IN ({placeholders})",
                    frontier,
                )
            ]
            frontier = [c for c in children if c not in live]
            live.update(frontier)
        dead = [
            row[0]
            for row in self.db.execute(
                "SELECT digest FROM manifests UNION SELECT digest FROM blobs"
            )
            if row[0] not in live
        ]
        for digest in dead:
            self.db.execute("DELETE FROM manifests WHERE digest=?", (digest,))
            self.db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
            self.db.execute("DELETE FROM manifest_refs WHERE parent=?", (digest,))
        return dead

    # -- consistency with the files ------------------------------------------

    @tolerant
    def forget(self, digests: Iterable[str]) -> list[tuple[str, str, str]]:
        """Drop every row of content whose file is gone or corrupt: its blob or
        manifest row, the manifest's references, the repositories holding it and
        the tags pointing at it (returned as (registry, repository, tag)).
        The content is fetched again on the next request."""
        digests = list(digests)
        dropped: list[tuple[str, str, str]] = []
        with self.db:
            self.db.execute("BEGIN")
            for digest in digests:
                dropped += self.db.execute(
                    "SELECT registry, repository, tag FROM tags WHERE digest=?", (digest,)
                ).fetchall()
                for table, column in (
                    ("blobs", "digest"),
                    ("manifests", "digest"),
                    ("manifest_refs", "parent"),
                    ("tags", "digest"),
                    ("repo_manifests", "digest"),
                ):
                    self.db.execute(f"DELETE FROM {table} WHERE {column}=?", (digest,))
        self._invalidate()
        return dropped

    def reconcile(self, store: BlobStore) -> tuple[int, int]:
        """Make the index agree with the files; returns (rows dropped, blobs added).

        Rows whose file is missing are dropped (their content is fetched again
        on demand). Verified files the index does not know (a crash between
        rename and insert) are recorded as blobs.
        """
        on_disk = {str(digest): size for digest, size in store}
        dropped = 0
        with self.db:
            self.db.execute("BEGIN")
            for table in ("blobs", "manifests"):
                for (digest,) in self.db.execute(f"SELECT digest FROM {table}").fetchall():
                    if digest not in on_disk:
                        self.db.execute(f"DELETE FROM {table} WHERE digest=?", (digest,))
                        dropped += 1
            self.db.execute("DELETE FROM tags WHERE digest NOT IN (SELECT digest FROM manifests)")
            self.db.execute(
                "DELETE FROM repo_manifests WHERE digest NOT IN (SELECT digest FROM manifests)"
            )
            known = {
                row[0]
                for row in self.db.execute(
                    "SELECT digest FROM blobs UNION SELECT digest FROM manifests"
                )
            }
            now = time.time()
            added = [(d, s, now, now) for d, s in on_disk.items() if d not in known]
            self.db.executemany("INSERT INTO blobs VALUES (?,?,?,?)", added)
        self._invalidate()
        return dropped, len(added)


def open_index(data: Path) -> tuple[BlobStore, Index]:
    """Open the cache in ``data``. An index that cannot be opened for writing
    (read-only directory) leaves an in-memory one: stowage then passes
    content through uncached instead of failing."""
    with contextlib.suppress(OSError):
        data.mkdir(parents=True, exist_ok=True)
    store = BlobStore(data)
    path = data / "index.db"
    try:
        return store, Index(path)
    except sqlite3.Error as exc:
        index = Index(Path(":memory:"))
        try:
            index.load_read_only(path)
        except sqlite3.Error as ro_exc:
            log.warning("index unavailable: caching is off", path=str(path), error=str(exc))
            log.debug("index not readable either", path=str(path), error=str(ro_exc))
        else:
            log.warning(
                "index not writable: serving what is cached, caching is off",
                path=str(path),
                error=str(exc),
            )
        return store, index
