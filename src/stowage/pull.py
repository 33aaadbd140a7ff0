"""Pull an image over the distribution API the way containerd does:
manifest (and the platform's manifest of an index), then config and layers,
three at a time, each verified against its digest. Used by
``stowage cache warm`` and by the benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from stowage.oci.digest import Digest
from stowage.oci.manifest import (
    INDEX_TYPES,
    UPSTREAM_ACCEPT,
    Descriptor,
    Platform,
    parse_manifest,
    select_platform,
)

PARALLEL_BLOBS = 3
CHUNK = 1024 * 1024


class PullError(Exception):
    pass


class PlatformMissing(PullError):
    """An index without the asked platform."""


@dataclass(slots=True)
class BlobTiming:
    digest: str
    size: int
    seconds: float


@dataclass(slots=True)
class PullResult:
    manifest_digest: str
    media_type: str
    platform_digest: str | None
    blobs: list[BlobTiming] = field(default_factory=list)
    manifest_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs)


Progress = Callable[[int], None]  # bytes received


async def pull(
    session: aiohttp.ClientSession,
    base_url: str,
    name: str,
    reference: str,
    platform: Platform,
    *,
    headers: dict[str, str] | None = None,
    on_manifest: Callable[[int], None] | None = None,
    on_bytes: Progress | None = None,
) -> PullResult:
    """Pull ``name:reference`` from the registry at ``base_url`` (``/v2/`` API).

    ``on_manifest`` is told the total blob bytes once known, ``on_bytes``
    each chunk received.
    """
    started = time.perf_counter()
    hdrs = headers or {}
    body, media_type, digest = await _get_manifest(session, base_url, name, reference, hdrs)
    result = PullResult(digest, media_type, None)
    kind, refs = parse_manifest(body, media_type)
    if kind in INDEX_TYPES:
        chosen = select_platform(refs, platform)
        if chosen is None:
            available = ", ".join(str(r.platform) for r in refs if r.platform)
            raise PlatformMissing(f"{name}:{reference} has no {platform} image (has: {available})")
        body, media_type, child = await _get_manifest(session, base_url, name, chosen.digest, hdrs)
        result.platform_digest = child
        kind, refs = parse_manifest(body, media_type)
    result.manifest_seconds = time.perf_counter() - started
    blobs = [r for r in refs if r.kind in ("config", "layer")]
    if on_manifest:
        on_manifest(sum(max(b.size, 0) for b in blobs))
    sem = asyncio.Semaphore(PARALLEL_BLOBS)

    async def one(desc: Descriptor) -> BlobTiming:
        async with sem:
            return await _get_blob(session, base_url, name, desc, hdrs, on_bytes)

    result.blobs = list(await asyncio.gather(*(one(b) for b in blobs)))
    result.seconds = time.perf_counter() - started
    return result


async def _get_manifest(
    session: aiohttp.ClientSession, base: str, name: str, ref: str, headers: dict[str, str]
) -> tuple[bytes, str, str]:
    url = f"{base}/v2/{name}/manifests/{ref}"
    async with session.get(url, headers={"Accept": UPSTREAM_ACCEPT, **headers}) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise PullError(f"GET {url}: {resp.status} {_error_text(body)}")
        content_type = resp.headers.get("Content-Type", "")
    algorithm = ref.split(":", 1)[0] if ":" in ref else "sha256"
    digest = str(Digest.of(body, algorithm))
    if ":" in ref and digest != ref:
        raise PullError(f"manifest {ref} arrived with digest {digest}")
    return body, content_type, digest


async def _get_blob(
    session: aiohttp.ClientSession,
    base: str,
    name: str,
    desc: Descriptor,
    headers: dict[str, str],
    on_bytes: Progress | None,
) -> BlobTiming:
    url = f"{base}/v2/{name}/blobs/{desc.digest}"
    expected = Digest.parse(desc.digest)
    hasher = expected.hasher()
    size = 0
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    # Hash in a thread (hashlib drops the GIL) while the loop receives the next
    # chunk: on the loop, sha256 would take half a core from every transfer.
    # Reads return what has arrived (often a few KiB): hand the thread batches of
    # at least CHUNK, or the hand-offs cost more than the hashing they move.
    hashing: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    batched = 0

    def digest_batch(chunks: list[bytes]) -> None:
        for chunk in chunks:
            hasher.update(chunk)

    async with session.get(url, headers=headers) as resp:
        if resp.status != 200:
            raise PullError(f"GET {url}: {resp.status} {_error_text(await resp.read())}")
        async for chunk in resp.content.iter_chunked(CHUNK):
            batch.append(chunk)
            batched += len(chunk)
            size += len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
            if batched >= CHUNK:
                if hashing is not None:
                    await hashing
                hashing = loop.run_in_executor(None, digest_batch, batch)
                batch, batched = [], 0
    if hashing is not None:
        await hashing
    digest_batch(batch)
    if hasher.hexdigest() != expected.hex:
        raise PullError(f"blob {desc.digest} arrived with a different digest")
    return BlobTiming(desc.digest, size, time.perf_counter() - started)


def _error_text(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace").strip()
