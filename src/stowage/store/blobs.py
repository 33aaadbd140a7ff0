"""Content-addressed blob files on local disk.

Layout under the data directory::

    blobs/<algorithm>/<first two hex>/<hex>   verified content, never modified in place
    tmp/<random>                              fills in progress; swept at start-up

A blob only appears under ``blobs/`` by an atomic rename after its digest was
verified, so a reader never sees a partial or unverified file there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from stowage.oci.digest import Digest, InvalidDigest


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        # A read-only or missing directory is not fatal: fills then fail to
        # create their temporary file and blobs are passed through uncached.
        with contextlib.suppress(OSError):
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def size(self, digest: Digest) -> int | None:
        """Size of a stored blob, or None when absent."""
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def new_temp(self) -> tuple[int, Path]:
        """Open a fresh temporary file for writing; returns (fd, path)."""
        path = self.tmp / secrets.token_hex(12)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        return fd, path

    def commit(self, temp: Path, digest: Digest) -> Path:
        """Move a verified (and fsynced) temporary file into place."""
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        return final

    def write(self, digest: Digest, data: bytes) -> Path:
        """Store small verified content (manifests) atomically."""
        fd, temp = self.new_temp()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            discard(temp)
            raise
        return self.commit(temp, digest)

    def read(self, digest: Digest) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, digest: Digest) -> bool:
        try:
            os.unlink(self.path(digest))
            return True
        except FileNotFoundError:
            return False

    def sweep_temp(self) -> int:
        """Delete leftovers of fills that never finished (crash, kill -9)."""
        count = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp):
                discard(Path(entry.path))
                count += 1
        return count

    def __iter__(self) -> Iterator[tuple[Digest, int]]:
        """Every stored blob with its size (used to reconcile the index)."""
        for algo_dir in _scandirs(self.blobs):
            for prefix_dir in _scandirs(Path(algo_dir.path)):
                for entry in os.scandir(prefix_dir.path):
                    try:
                        digest = Digest.parse(f"{algo_dir.name}:{entry.name}")
                    except InvalidDigest:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        yield digest, entry.stat().st_size


def discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _scandirs(path: Path) -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(path) if e.is_dir()]
    except FileNotFoundError:
        return []
