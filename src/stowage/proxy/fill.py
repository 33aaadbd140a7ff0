"""Single-flight blob fills that clients stream from while they grow.

One fill per digest: it downloads from upstream into a temporary file, and a
writer thread hashes and writes the bytes off the event loop. Every client of
that digest (the first included) reads the temporary file up to what has been
written, so a slow or vanished client neither slows nor aborts the fill. The
last byte is released only once the digest is verified, so no client ever
receives a complete wrong blob; on a mismatch or an upstream failure clients
are cut off and nothing is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from stowage.oci.digest import Digest
from stowage.store.blobs import BlobStore, discard
from stowage.store.index import Index
from stowage.upstream.client import Upstream, UpstreamError, UpstreamInvalid, UpstreamUnavailable

log = structlog.get_logger("stowage.fill")

# Bytes received but not yet written before the download waits for the disk:
# bounds memory per fill whatever the speed of either side.
MAX_QUEUED = 2 * 1024 * 1024
READ_SIZE = 1024 * 1024


# After the disk refused a fill (full, read-only), blobs are passed through
# uncached for this long before caching is tried again.
DEGRADED_RETRY = 30.0
# How long shutdown waits for verified blobs to be fsynced and committed.
COMMIT_WAIT = 30.0


class DigestMismatch(UpstreamInvalid):
    pass


class CacheUnavailable(Exception):
    """The data directory cannot take this blob now: serve it uncached."""


class Fill:
    def __init__(
        self,
        digest: Digest,
        registry: str,
        repository: str,
        store: BlobStore,
        index: Index,
        upstream: Upstream,
    ) -> None:
        self.digest = digest
        self.registry = registry
        self.repository = repository
        self._store = store
        self._index = index
        self._upstream = upstream
        self._loop = asyncio.get_running_loop()
        self.size: int | None = None
        self.path: Path | None = None
        self.written = 0
        self.done = False
        self.verified = False
        self.error: BaseException | None = None
        self.via_parent = False  # the bytes come from the parent stowage
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._changed = asyncio.Event()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued = 0
        self._thread_written = 0
        self._thread_error: BaseException | None = None
        self._notify_pending = False
        self._lock = threading.Lock()
        self._drained = asyncio.Event()

    # -- reader side ---------------------------------------------------------

    async def ready(self) -> None:
        """Wait until upstream answered (size known, file open); raises its error."""
        await asyncio.shield(self._ready)

    def readable(self) -> int:
        """Bytes a client may read now: all once verified, else all but the last."""
        if self.verified:
            return self.written
        return max(0, self.written - 1)

    async def wait(self) -> None:
        """Wait for more bytes, completion or failure."""
        await self._changed.wait()

    def _wake(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- writer side ---------------------------------------------------------

    async def run(self) -> None:
        fd: int | None = None
        temp: Path | None = None
        writer: asyncio.Future[None] | None = None  # the writer thread is done
        try:
            try:
                fd, temp = self._store.new_temp()
            except OSError as exc:
                raise CacheUnavailable(f"cannot create a temporary file: {exc}") from exc
            self.path = temp
            resp = await self._upstream.open_blob(self.registry, self.repository, str(self.digest))
            self.via_parent = self._upstream.from_parent(resp)
            async with resp:
                self.size = resp.content_length
                hashed: asyncio.Future[str] = self._loop.create_future()
                writer = self._loop.create_future()
                threading.Thread(
                    target=self._write_thread,
                    args=(fd, hashed, writer),
                    daemon=True,
                    name="fill-writer",
                ).start()
                fd = None  # the writer thread closes it
                self._ready.set_result(None)
                await self._download(resp)
            self._queue.put(None)
            try:
                actual = await hashed
            except OSError as exc:
                raise CacheUnavailable(f"cannot write blob: {exc}") from exc
            if actual != self.digest.hex:
                raise DigestMismatch(
                    self.registry,
                    f"blob {self.digest} arrived with digest {self.digest.algorithm}:{actual}",
                    status=502,
                )
            if self.size is not None and self.written != self.size:
                raise UpstreamUnavailable(
                    self.registry,
                    f"blob {self.digest} ended at {self.written} of {self.size} bytes",
                )
            # Verified: clients get the last byte now; durability is the cache's
            # business, not theirs, so they do not wait for the fsync.
            self.verified = True
            self._wake()
            try:
                await writer
            except OSError as exc:
                raise CacheUnavailable(f"cannot persist blob: {exc}") from exc
            finally:
                writer = None
            try:
                self.path = self._store.commit(temp, self.digest)
            except OSError as exc:
                raise CacheUnavailable(f"cannot store blob: {exc}") from exc
            temp = None
            self.size = self.written
            self._index.add_blob(str(self.digest), self.written)
            self.done = True
        except BaseException as exc:
            self.error = exc
            if not self._ready.done():
                self._ready.set_exception(exc)
                self._ready.exception()  # retrieved: readers get it from ready()
            # CacheUnavailable is logged by Fills, which pauses caching.
            if not isinstance(exc, CacheUnavailable | UpstreamError | asyncio.CancelledError):
                log.error("fill failed", digest=str(self.digest), error=repr(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if writer is not None:
                self._queue.put(None)
                with contextlib.suppress(BaseException):
                    await writer
            elif fd is not None:
                os.close(fd)
            if temp is not None:
                discard(temp)
            self._wake()

    async def _download(self, resp: aiohttp.ClientResponse) -> None:
        try:
            while True:
                chunk = await resp.content.read(READ_SIZE)
                if not chunk:
                    return
                if self._thread_error is not None:
                    raise CacheUnavailable(f"cannot write blob: {self._thread_error}")
                with self._lock:
                    self._queued += len(chunk)
                    queued = self._queued
                self._queue.put(chunk)
                if queued > MAX_QUEUED:
                    self._drained.clear()
                    await self._drained.wait()
        except TimeoutError as exc:
            raise UpstreamUnavailable(self.registry, f"blob {self.digest} timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                self.registry, f"blob {self.digest} cut short after {self.written} bytes: {exc}"
            ) from exc

    def _write_thread(
        self, fd: int, hashed: asyncio.Future[str], finished: asyncio.Future[None]
    ) -> None:
        hasher = self.digest.hasher()
        error: BaseException | None = None
        while True:
            chunk = self._queue.get()
            if chunk is None:
                break
            if error is None:
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    hasher.update(chunk)
                except OSError as exc:
                    error = self._thread_error = exc
            with self._lock:
                self._queued -= len(chunk)
                if error is None:
                    self._thread_written += len(chunk)
                notify = not self._notify_pending
                self._notify_pending = True
            if notify:
                self._loop.call_soon_threadsafe(self._progress)
        digest = hasher.hexdigest() if error is None else None
        self._loop.call_soon_threadsafe(_settle, hashed, digest, error)
        try:
            if error is None:
                os.fsync(fd)
        except OSError as exc:
            error = exc
        finally:
            os.close(fd)
        self._loop.call_soon_threadsafe(_settle, finished, None, error)

    def _progress(self) -> None:
        with self._lock:
            self._notify_pending = False
            self.written = self._thread_written
            queued = self._queued
        if queued <= MAX_QUEUED // 2:
            self._drained.set()
        self._wake()


def _settle(fut: asyncio.Future[Any], value: object, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
        fut.exception()  # retrieved: whoever awaits it re-raises it
    else:
        fut.set_result(value)


class Fills:
    """The fills in flight, one per digest."""

    def __init__(
        self,
        store: BlobStore,
        index: Index,
        upstream: Upstream,
        on_change: Callable[[int], None] = lambda n: None,
        on_mismatch: Callable[[str], None] = lambda registry: None,
        retry: float = DEGRADED_RETRY,
    ) -> None:
        self._retry = retry
        self._store = store
        self._index = index
        self._upstream = upstream
        self._fills: dict[str, Fill] = {}
        self._tasks: dict[asyncio.Task[None], Fill] = {}
        self._on_change = on_change
        self._on_mismatch = on_mismatch
        self._degraded_until = 0.0
        # Called with its size after a fill was stored (the bounded cache's trigger).
        self.on_commit: Callable[[int], None] = lambda size: None

    def degraded(self) -> bool:
        """Whether the disk recently refused a fill (caching paused)."""
        return time.monotonic() < self._degraded_until

    def get(self, digest: Digest) -> Fill | None:
        return self._fills.get(str(digest))

    def start(self, digest: Digest, registry: str, repository: str) -> Fill:
        key = str(digest)
        fill = self._fills.get(key)
        if fill is not None:
            return fill
        fill = Fill(digest, registry, repository, self._store, self._index, self._upstream)
        self._fills[key] = fill
        self._on_change(len(self._fills))
        # A task of its own: a client going away must never cancel the fill.
        task = asyncio.get_running_loop().create_task(self._run(key, fill), name=f"fill {key}")
        self._tasks[task] = fill
        task.add_done_callback(self._tasks.pop)
        return fill

    async def _run(self, key: str, fill: Fill) -> None:
        try:
            await fill.run()
            if fill.done:
                self.on_commit(fill.written)
            if isinstance(fill.error, CacheUnavailable):
                self._degraded_until = time.monotonic() + self._retry
                log.warning(
                    "caching paused: serving uncached",
                    digest=key,
                    reason=str(fill.error),
                    retry_in=self._retry,
                )
            elif isinstance(fill.error, DigestMismatch):
                # Counted once per fill, however many clients it had.
                log.warning(
                    "digest mismatch: blob rejected",
                    digest=key,
                    registry=fill.registry,
                    via_parent=fill.via_parent,
                )
                self._on_mismatch(fill.registry)
            if fill.via_parent and isinstance(fill.error, UpstreamError):
                # Wrong or cut short: the clients' retries go to the registry.
                self._upstream.blame_parent(
                    str(fill.error), mismatch=isinstance(fill.error, DigestMismatch)
                )
        finally:
            if self._fills.get(key) is fill:
                del self._fills[key]
            self._on_change(len(self._fills))

    async def close(self) -> None:
        """Stop downloads in progress; let verified blobs finish their commit,
        so a shutdown right after a pull keeps what its clients received."""
        for task, fill in list(self._tasks.items()):
            if not fill.verified:
                task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*self._tasks, return_exceptions=True), timeout=COMMIT_WAIT
            )
