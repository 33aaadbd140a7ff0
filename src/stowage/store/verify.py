"""``stowage cache verify``: rehash every cached file, remove what is corrupt.

A blob is verified once, when it is filled; a bit flipped on disk afterwards
would be served as it is. Verification reads every file under ``blobs/``
again and compares it with the digest it is named by. A file that does not
match is deleted together with its index rows (and the tags pointing at a
manifest), so the next request fetches it again from upstream. Index rows
whose file is missing are dropped as well.

Safe while stowage serves the same directory: files are only ever replaced by
an atomic rename, and the server notices the index changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stowage.oci.digest import Digest
from stowage.store.blobs import BlobStore
from stowage.store.index import Index

READ_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Finding:
    digest: str
    kind: str  # "blob" or "manifest"
    problem: str  # "corrupt" (content does not match its digest) or "missing" (row, no file)
    detail: str
    tags: tuple[str, ...] = ()  # tags dropped with a manifest, registry/repository:tag


@dataclass(slots=True)
class VerifyReport:
    files: int = 0
    bytes: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings


def file_digest(path: Path, digest: Digest) -> tuple[str, int]:
    """(hex digest of the file with the algorithm of ``digest``, bytes read)."""
    hasher = digest.hasher()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            hasher.update(view[:n])
            size += n
    return hasher.hexdigest(), size


def verify(store: BlobStore, index: Index) -> VerifyReport:
    """Check every file against its digest; remove the corrupt ones and their rows."""
    report = VerifyReport()
    manifests = {row[0] for row in index.db.execute("SELECT digest FROM manifests")}
    for digest, _ in store:
        path = store.path(digest)
        try:
            before = os.stat(path)
            actual, size = file_digest(path, digest)
        except FileNotFoundError:
            continue  # removed meanwhile (cache rm, eviction)
        report.files += 1
        report.bytes += size
        if actual == digest.hex:
            continue
        # Replaced or removed while we read it (a refill, an eviction)?
        try:
            after = os.stat(path)
        except FileNotFoundError:
            continue
        if (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
            continue
        store.remove(digest)
        kind = "manifest" if str(digest) in manifests else "blob"
        tags = index.forget([str(digest)]) or []
        report.findings.append(
            Finding(
                str(digest),
                kind,
                "corrupt",
                f"{size} bytes on disk hash to {digest.algorithm}:{actual}",
                tuple(f"{reg}/{repo}:{tag}" for reg, repo, tag in tags),
            )
        )
    report.findings += _rows_without_files(store, index)
    return report


def _rows_without_files(store: BlobStore, index: Index) -> list[Finding]:
    found: list[Finding] = []
    rows = index.db.execute(
        "SELECT digest, 'blob' FROM blobs UNION SELECT digest, 'manifest' FROM manifests"
    ).fetchall()
    for digest, kind in rows:
        try:
            parsed = Digest.parse(digest)
        except ValueError:
            parsed = None
        if parsed is not None and store.size(parsed) is not None:
            continue
        tags = index.forget([digest]) or []
        found.append(
            Finding(
                digest,
                kind,
                "missing",
                "indexed but its file is gone",
                tuple(f"{reg}/{repo}:{tag}" for reg, repo, tag in tags),
            )
        )
    return found
