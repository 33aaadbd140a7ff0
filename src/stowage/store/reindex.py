"""Rebuild the SQLite index from the content on disk.

The files under ``blobs/`` are the truth: every one of them is named by the
digest of its content. When ``index.db`` is lost or corrupt, the index is
rebuilt from them: every file becomes a blob row, and files that are
manifests or indexes (JSON with a manifest ``mediaType``, or ``schemaVersion``
with ``layers``/``manifests``/``fsLayers``) become manifest rows with their
references, after their digest is checked.

What content cannot say is which repositories held it and which tags pointed
at it: those are lost with the index (a pull by tag restores them), and the
content stays served by digest. When the index is readable (``stowage cache
reindex`` on a healthy cache), tags and repositories whose manifest is still
on disk are kept.

At start-up (:func:`open_cache`) an index SQLite cannot read is moved aside as
``index.db.corrupt-<timestamp>`` and rebuilt, with a warning in the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import structlog

from stowage.oci.digest import Digest
from stowage.oci.manifest import (
    DOCKER_V1,
    DOCKER_V1_SIGNED,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    InvalidManifest,
    parse_manifest,
)
from stowage.store.blobs import BlobStore
from stowage.store.index import Index, open_index

log = structlog.get_logger("stowage.reindex")

INDEX_FILE = "index.db"
LOST_NOTE = (
    "tags and repository names cannot be recovered from content: cached content is "
    "served by digest, and a pull by tag restores the tag"
)

State = Literal["ok", "missing", "corrupt"]


class CorruptManifest(Exception):
    """A manifest file whose content does not match its digest."""


@dataclass(slots=True)
class RebuildReport:
    blobs: int = 0
    manifests: int = 0
    bytes: int = 0
    corrupt_removed: list[str] = field(default_factory=list)
    tags_kept: int = 0
    tags_dropped: int = 0
    reason: str | None = None  # why the index was rebuilt from nothing
    moved_aside: Path | None = None  # where the unreadable index went


# -- the state of index.db -----------------------------------------------------


def inspect_index(path: Path) -> tuple[State, str]:
    """Whether the index file is usable: ("ok" | "missing" | "corrupt", detail).

    An index that cannot be opened for reasons other than its content (a
    read-only or unreadable directory) is "ok" here: it is not rebuilt, and
    opening it falls back to running without a cache.
    """
    if not path.exists():
        return "missing", f"{path} does not exist"
    try:
        con = sqlite3.connect(path)
        try:
            checked = [row[0] for row in con.execute("PRAGMA quick_check").fetchall()]
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            return "corrupt", str(exc)
        return "ok", str(exc)
    if checked != ["ok"]:
        return "corrupt", "; ".join(str(c) for c in checked[:3])
    if not {"blobs", "manifests"} <= tables:
        return "missing", f"{path} holds no stowage index"
    return "ok", ""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    # Without an error name (older SQLite bindings), only plain DatabaseErrors
    # ("file is not a database", "database disk image is malformed") are corruption.
    return not name and type(exc) is sqlite3.DatabaseError


def move_aside(path: Path) -> Path:
    """Rename an unreadable index (and its WAL) to index.db.corrupt-<timestamp>."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            os.replace(side, target.with_name(target.name + suffix))
    os.replace(path, target)
    return target


# -- reading content -----------------------------------------------------------


def read_manifest(
    path: Path, digest: Digest, size: int, known_type: str | None = None
) -> tuple[str, list[tuple[str, str]]] | None:
    """(media type, [(child digest, kind)]) when the file is a manifest or index.

    ``known_type`` is the media type the old index recorded for it, if any:
    such a file is a manifest whatever its shape. Raises CorruptManifest when a
    manifest does not match its digest.
    """
    if size > MAX_MANIFEST_SIZE or size < 2:
        return None
    with open(path, "rb") as f:
        body = f.read(MAX_MANIFEST_SIZE + 1)
    if known_type is None and body.lstrip()[:1] != b"{":
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if known_type is None and not _looks_like_manifest(doc):
        return None
    if Digest.of(body, digest.algorithm) != digest:
        raise CorruptManifest(f"{digest}: content does not match its digest")
    hint = known_type
    if hint is None and isinstance(doc, dict) and doc.get("schemaVersion") == 1:
        hint = DOCKER_V1_SIGNED if "signatures" in doc else DOCKER_V1
    try:
        media_type, refs = parse_manifest(body, hint)
    except InvalidManifest:
        if known_type is None:
            return None
        media_type, refs = known_type, []
    return known_type or media_type, [(r.digest, r.kind) for r in refs]


def _looks_like_manifest(doc: object) -> bool:
    if not isinstance(doc, dict):
        return False
    if doc.get("mediaType") in INDEX_TYPES | MANIFEST_TYPES:
        return True
    return "schemaVersion" in doc and any(k in doc for k in ("layers", "manifests", "fsLayers"))


# -- rebuilding ----------------------------------------------------------------


def rebuild(store: BlobStore, index: Index) -> RebuildReport:
    """Make the index's content rows exactly the files on disk.

    Blob and manifest rows (and manifest references) are replaced by what the
    files say; access times of content the index already knew are kept; tags
    and repository entries are kept when their manifest is still there.
    Manifest files that do not match their digest are deleted.
    """
    report = RebuildReport()
    db = index.db
    known_types = dict(db.execute("SELECT digest, media_type FROM manifests").fetchall())
    blobs: list[tuple[str, int]] = []
    manifests: list[tuple[str, str, int]] = []
    refs: list[tuple[str, str, str]] = []
    for digest, size in store:
        key = str(digest)
        try:
            manifest = read_manifest(store.path(digest), digest, size, known_types.get(key))
        except CorruptManifest:
            store.remove(digest)
            report.corrupt_removed.append(key)
            continue
        except FileNotFoundError:
            continue
        report.bytes += size
        if manifest is None:
            blobs.append((key, size))
        else:
            media_type, children = manifest
            manifests.append((key, media_type, size))
            refs += [(key, child, kind) for child, kind in children]
    now = time.time()
    with db:
        db.execute("BEGIN IMMEDIATE")
        times = {
            row[0]: (row[1], row[2])
            for row in db.execute(
                "SELECT digest, created, last_access FROM blobs "
                "UNION ALL SELECT digest, created, last_access FROM manifests"
            )
        }
        tags_before = db.execute("SELECT count(*) FROM tags").fetchone()[0]
        for table in ("blobs", "manifests", "manifest_refs"):
            db.execute(f"DELETE FROM {table}")
        db.executemany(
            "INSERT OR REPLACE INTO blobs VALUES (?,?,?,?)",
            [(d, s, *times.get(d, (now, now))) for d, s in blobs],
        )
        db.executemany(
            "INSERT OR REPLACE INTO manifests VALUES (?,?,?,?,?)",
            [(d, t, s, *times.get(d, (now, now))) for d, t, s in manifests],
        )
        db.executemany("INSERT OR IGNORE INTO manifest_refs VALUES (?,?,?)", refs)
        db.execute("DELETE FROM tags WHERE digest NOT IN (SELECT digest FROM manifests)")
        db.execute("DELETE FROM repo_manifests WHERE digest NOT IN (SELECT digest FROM manifests)")
        report.tags_kept = db.execute("SELECT count(*) FROM tags").fetchone()[0]
    report.tags_dropped = tags_before - report.tags_kept
    report.blobs, report.manifests = len(blobs), len(manifests)
    index.forget(())  # drops the index's in-memory copies
    return report


def reindex(data: Path) -> RebuildReport:
    """``stowage cache reindex``: rebuild the index of ``data`` from its files.

    A corrupt index is moved aside first and rebuilt from nothing; a readable
    one is rebuilt in place, keeping its tags. Raises sqlite3.Error or OSError
    when the index cannot be written.
    """
    path = data / INDEX_FILE
    state, detail = inspect_index(path)
    moved = move_aside(path) if state == "corrupt" else None
    store = BlobStore(data)
    index = Index(path)
    try:
        report = rebuild(store, index)
    finally:
        index.close()
    if state != "ok":
        report.reason, report.moved_aside = detail, moved
    return report


def open_cache(data: Path) -> tuple[BlobStore, Index, RebuildReport | None]:
    """Open the cache for serving, rebuilding an index that is lost or unreadable.

    A corrupt index is moved aside and rebuilt from the files; a missing one is
    rebuilt when there are files. If the corrupt index cannot even be moved
    (read-only directory), stowage runs without a cache (pass-through).
    """
    path = data / INDEX_FILE
    state, detail = inspect_index(path)
    moved: Path | None = None
    if state == "corrupt":
        try:
            moved = move_aside(path)
        except OSError as exc:
            log.error(
                "index corrupt and cannot be moved aside: caching is off",
                path=str(path),
                problem=detail,
                error=str(exc),
            )
            return BlobStore(data), Index(Path(":memory:")), None
    store, index = open_index(data)
    if state == "ok" or index.path == Path(":memory:"):
        return store, index, None
    if state == "missing" and next(iter(store), None) is None:
        return store, index, None  # a new cache
    try:
        report = rebuild(store, index)
    except (OSError, sqlite3.Error) as exc:
        log.error("index rebuild failed", path=str(path), error=str(exc))
        return store, index, None
    report.reason, report.moved_aside = detail, moved
    log.warning(
        "index rebuilt from the content on disk",
        reason=detail,
        moved_aside=str(moved) if moved else None,
        blobs=report.blobs,
        manifests=report.manifests,
        bytes=report.bytes,
        corrupt_manifests_removed=len(report.corrupt_removed),
        note=LOST_NOTE,
    )
    return store, index, report
