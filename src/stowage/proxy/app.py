"""The caching registry proxy: aiohttp application and request handlers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
import structlog
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from stowage.metrics import exposition
from stowage.oci.digest import Digest, InvalidDigest, UnsupportedDigest, is_digest
from stowage.oci.manifest import Descriptor, InvalidManifest, parse_manifest
from stowage.oci.reference import is_valid_tag
from stowage.proxy.access import CHALLENGE, AccessGate
from stowage.proxy.errors import API_VERSION, OCIError
from stowage.proxy.fill import CacheUnavailable, DigestMismatch, Fill, Fills
from stowage.proxy.metrics import Metrics
from stowage.proxy.routing import Route, parse_route
from stowage.proxy.tagpage import TagPage, next_link, page_tag_body, page_tags
from stowage.store.blobs import BlobStore
from stowage.store.gc import Hold, Readers
from stowage.store.index import Index, ManifestEntry
from stowage.upstream.client import (
    FetchedManifest,
    Upstream,
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = structlog.get_logger("stowage.proxy")

BLOB_TYPE = "application/octet-stream"
MANIFEST_MEMORY = 32 * 1024 * 1024  # bytes of manifests kept in memory
CHUNK = 1024 * 1024
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux only
FLUSH_INTERVAL = 5.0


@dataclass(slots=True)
class ProxyConfig:
    default_registry: str = "docker.io"
    tag_ttl: float = 300.0
    revalidate_timeout: float = 5.0
    known_registries: frozenset[str] = frozenset()
    cache_retry: float = 30.0  # seconds blobs pass through uncached after the disk refused one
    auth_cache_ttl: float = 300.0  # seconds a verdict on a client's credentials is reused


@dataclass(slots=True)
class Manifest:
    body: bytes
    media_type: str
    digest: str


@dataclass(slots=True)
class _Flights:
    """Single-flight for manifest fetches: one upstream request per key."""

    running: dict[tuple[str, str, str], asyncio.Future[Manifest]] = field(default_factory=dict)

    async def run(
        self, key: tuple[str, str, str], fetch: Callable[[], Awaitable[Manifest]]
    ) -> Manifest:
        fut = self.running.get(key)
        if fut is None:
            fut = asyncio.ensure_future(fetch())
            self.running[key] = fut
            fut.add_done_callback(lambda f: self._finished(key, f))
        # Shielded: a client that goes away does not cancel the others' fetch.
        return await asyncio.shield(fut)

    def _finished(self, key: tuple[str, str, str], fut: asyncio.Future[Manifest]) -> None:
        self.running.pop(key, None)
        if not fut.cancelled():
            fut.exception()  # retrieved here: every waiter may have gone


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        store: BlobStore,
        index: Index,
        upstream: Upstream,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.upstream = upstream
        self.metrics = metrics
        self.fills = Fills(
            store,
            index,
            upstream,
            on_change=metrics.fills_in_flight.set,
            on_mismatch=lambda registry: metrics.digest_mismatches.labels(registry).inc(),
            retry=config.cache_retry,
        )
        self.access = AccessGate(
            index,
            upstream,
            metrics.registry,
            ttl=config.auth_cache_ttl,
            recheck=config.tag_ttl,
            timeout=config.revalidate_timeout,
        )
        self._flights = _Flights()
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._manifest_bytes = 0
        # Blobs being sent: the bounded cache never deletes them under a reader.
        self.readers = Readers()

    # -- dispatch ------------------------------------------------------------

    async def handle_v2(self, request: web.Request) -> web.StreamResponse:
        if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            raise OCIError(
                405,
                "UNSUPPORTED",
                f"{request.method} is not supported: stowage is a read-only cache",
                headers={"Allow": "GET, HEAD"},
            )
        tail = request.match_info.get("tail", "")  # "/v2" has none
        if tail == "":
            request["route"] = "base"
            if self.access.challenge_ping(request.headers.get(hdrs.AUTHORIZATION)):
                # Clients send credentials only to a registry whose ping asked for them.
                raise OCIError(401, "UNAUTHORIZED", "authentication required", CHALLENGE)
            return web.json_response({}, headers=API_VERSION)
        raw = request.raw_path.split("?", 1)[0].lower()
        if "%2f" in raw or "%5c" in raw or "\\" in tail or "/../" in f"/{tail}/":
            raise OCIError(400, "NAME_INVALID", "encoded slashes and dot segments are not allowed")
        route = parse_route(
            tail,
            request.query.get("ns"),
            self.config.default_registry,
            self.config.known_registries,
        )
        request["route"] = route.kind
        if route.mirror:
            request["oci_namespace"] = route.registry
        # Private images only to credentials upstream accepts (see proxy/access.py).
        await self.access.authorize(route, request.headers.get(hdrs.AUTHORIZATION))
        resp: web.StreamResponse
        try:
            if route.kind == "manifests":
                resp = await self._manifest(request, route)
            elif route.kind == "blobs":
                resp = await self._blob(request, route)
            else:
                resp = await self._tags(request, route)
        except UpstreamError as exc:
            raise self._upstream_error(exc, route) from exc
        return resp

    def _upstream_error(self, exc: UpstreamError, route: Route) -> OCIError:
        where = f"{route.registry}/{route.repository}"
        if isinstance(exc, UpstreamNotFound):
            code = {"manifests": "MANIFEST_UNKNOWN", "blobs": "BLOB_UNKNOWN"}.get(
                route.kind, "NAME_UNKNOWN"
            )
            return OCIError(404, code, f"{where}: {exc}")
        if isinstance(exc, UpstreamDenied):
            return OCIError(403, "DENIED", f"{where}: {exc}")
        if isinstance(exc, DigestMismatch):
            return OCIError(502, "DIGEST_INVALID", str(exc))
        if isinstance(exc, UpstreamUnavailable) and exc.status == 429:
            retry = exc.retry_after
            headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else {}
            return OCIError(429, "TOOMANYREQUESTS", f"{exc} and nothing is cached", headers)
        if isinstance(exc, UpstreamInvalid) and exc.status == 413:
            return OCIError(413, "MANIFEST_INVALID", str(exc))
        suffix = " and nothing is cached" if isinstance(exc, UpstreamUnavailable) else ""
        # A timeout is the gateway's own verdict on a silent upstream: 504, as proxies say.
        status = 504 if isinstance(exc, UpstreamTimeout) else 502
        return OCIError(status, "UNAVAILABLE", f"{exc}{suffix}")

    # -- manifests -----------------------------------------------------------

    async def _manifest(self, request: web.Request, route: Route) -> web.Response:
        ref = route.reference
        if is_digest(ref):
            digest = _parse_digest(ref)
            entry = self.index.manifest(str(digest))
            cached = self._load_manifest(entry) if entry else None
            if cached is not None:
                request["result"] = "hit"
                return self._manifest_response(request, cached, "cache")
            manifest = await self._fetch_manifest(route, str(digest), digest)
            request["result"] = "miss"
            return self._manifest_response(request, manifest, "upstream")

        if not is_valid_tag(ref):
            raise OCIError(400, "TAG_INVALID", f"invalid tag {ref!r}")
        tag = self.index.tag(route.registry, route.repository, ref)
        cached = None
        if tag is not None:
            entry = self.index.manifest(tag.digest)
            cached = self._load_manifest(entry) if entry else None
        if cached is None:
            manifest = await self._fetch_manifest(route, ref, None)
            request["result"] = "miss"
            return self._manifest_response(request, manifest, "upstream")
        assert tag is not None
        if time.time() - tag.validated < self.config.tag_ttl:
            request["result"] = "hit"
            return self._manifest_response(request, cached, "cache")
        try:
            # Bounded: a hung upstream must not hold a pull that the cache can answer.
            async with asyncio.timeout(self.config.revalidate_timeout):
                manifest = await self._revalidate(route, ref, cached)
        except TimeoutError:
            log.warning(
                "serving stale manifest",
                image=f"{route.registry}/{route.repository}:{ref}",
                reason=f"upstream did not answer within {self.config.revalidate_timeout}s",
            )
            request["result"] = "stale"
            return self._manifest_response(request, cached, "cache")
        except (UpstreamUnavailable, UpstreamNotFound, UpstreamDenied, UpstreamInvalid) as exc:
            log.warning(
                "serving stale manifest",
                image=f"{route.registry}/{route.repository}:{ref}",
                reason=str(exc),
            )
            request["result"] = "stale"
            return self._manifest_response(request, cached, "cache")
        changed = manifest is not cached
        request["result"] = "miss" if changed else "hit"
        return self._manifest_response(request, manifest, "upstream" if changed else "cache")

    async def _revalidate(self, route: Route, tag: str, cached: Manifest) -> Manifest:
        key = (route.registry, route.repository, f"revalidate {tag}")
        return await self._flights.run(key, lambda: self._revalidate_once(route, tag, cached))

    async def _revalidate_once(self, route: Route, tag: str, cached: Manifest) -> Manifest:
        """HEAD the tag (free against pull quotas); fetch only if it moved."""
        head = await self.upstream.head_manifest(route.registry, route.repository, tag)
        if head.digest == cached.digest:
            self.index.set_tag(route.registry, route.repository, tag, cached.digest)
            return cached
        return await self._fetch_manifest(route, tag, None)

    async def _fetch_manifest(self, route: Route, ref: str, expected: Digest | None) -> Manifest:
        key = (route.registry, route.repository, ref)
        return await self._flights.run(key, lambda: self._fetch_manifest_once(route, ref, expected))

    async def _fetch_manifest_once(
        self, route: Route, ref: str, expected: Digest | None
    ) -> Manifest:
        fetched = await self.upstream.fetch_manifest(route.registry, route.repository, ref)
        try:
            digest, media_type, refs = self._verify_manifest(route, ref, fetched, expected)
        except UpstreamInvalid as exc:
            if not fetched.via_parent:
                raise
            # The parent sent a wrong or invalid manifest: back it off, ask the registry.
            self.upstream.blame_parent(str(exc), mismatch=isinstance(exc, DigestMismatch))
            fetched = await self.upstream.fetch_manifest(
                route.registry, route.repository, ref, parent=False
            )
            digest, media_type, refs = self._verify_manifest(route, ref, fetched, expected)
        content_type = fetched.content_type.split(";", 1)[0].strip() or media_type
        if content_type in ("application/json", "text/plain"):
            content_type = media_type
        manifest = Manifest(fetched.body, content_type, str(digest))
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self.store.write, digest, fetched.body
            )
        except OSError as exc:
            # Disk full or read-only: serve it, cache nothing (no index row without its file).
            log.warning("manifest not cached", digest=str(digest), reason=str(exc))
            return manifest
        self.index.add_manifest(
            route.registry,
            route.repository,
            str(digest),
            content_type,
            len(fetched.body),
            [(r.digest, r.kind) for r in refs],
        )
        self.access.holds_content(route.registry, route.repository)
        if expected is None:
            self.index.set_tag(route.registry, route.repository, ref, str(digest))
        self._remember(manifest)
        return manifest

    def _verify_manifest(
        self, route: Route, ref: str, fetched: FetchedManifest, expected: Digest | None
    ) -> tuple[Digest, str, list[Descriptor]]:
        """The manifest's digest, media type and references; raises DigestMismatch
        (counted) or UpstreamInvalid for what must not be served or cached."""
        algorithm = expected.algorithm if expected else "sha256"
        digest = Digest.of(fetched.body, algorithm)
        try:
            self._check_manifest_digest(route, ref, fetched.digest, digest, expected)
        except DigestMismatch:
            # Counted here, once per upstream fetch, not once per waiting client.
            self.metrics.digest_mismatches.labels(route.registry).inc()
            raise
        try:
            media_type, refs = parse_manifest(fetched.body, fetched.content_type)
        except InvalidManifest as exc:
            raise UpstreamInvalid(route.registry, f"invalid manifest: {exc}", status=502) from exc
        return digest, media_type, refs

    @staticmethod
    def _check_manifest_digest(
        route: Route, ref: str, claimed: str | None, digest: Digest, expected: Digest | None
    ) -> None:
        if expected is not None and digest != expected:
            raise DigestMismatch(
                route.registry, f"manifest {expected} arrived with digest {digest}", status=502
            )
        if claimed and claimed.startswith(f"{digest.algorithm}:") and claimed != str(digest):
            raise DigestMismatch(
                route.registry,
                f"manifest {route.repository}:{ref} has digest {digest}, "
                f"upstream claimed {claimed}",
                status=502,
            )

    def _load_manifest(self, entry: ManifestEntry) -> Manifest | None:
        manifest = self._manifests.get(entry.digest)
        if manifest is not None:
            self._manifests.move_to_end(entry.digest)
            return manifest
        digest = Digest.parse(entry.digest)
        body = self.store.read(digest)
        # Verified on every read from disk: a corrupted file is a miss, never served.
        if body is None or Digest.of(body, digest.algorithm) != digest:
            if body is not None:
                log.error("cached manifest corrupted; removing", digest=entry.digest)
                with contextlib.suppress(OSError):  # read-only: it stays a miss
                    self.store.remove(digest)
            # No index row without its file: the tags pointing at it go too,
            # and the next request fetches it again.
            self.index.forget([entry.digest])
            return None
        manifest = Manifest(body, entry.media_type, entry.digest)
        self._remember(manifest)
        return manifest

    def _remember(self, manifest: Manifest) -> None:
        if manifest.digest in self._manifests:
            return
        self._manifests[manifest.digest] = manifest
        self._manifest_bytes += len(manifest.body)
        while self._manifest_bytes > MANIFEST_MEMORY:
            _, old = self._manifests.popitem(last=False)
            self._manifest_bytes -= len(old.body)

    def _manifest_response(self, request: web.Request, m: Manifest, source: str) -> web.Response:
        if request.method == hdrs.METH_GET:
            request["bytes"] = (source, len(m.body))
        return web.Response(
            body=m.body,
            headers={
                hdrs.CONTENT_TYPE: m.media_type,
                "Docker-Content-Digest": m.digest,
                hdrs.ETAG: f'"{m.digest}"',
                **API_VERSION,
            },
        )

    # -- blobs ---------------------------------------------------------------

    async def _blob(self, request: web.Request, route: Route) -> web.StreamResponse:
        digest = _parse_digest(route.reference)
        headers = {"Docker-Content-Digest": str(digest), **API_VERSION}
        path = self.store.path(digest)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            stat = None
        if stat is not None:
            _check_cached_range(request, stat)
            request["result"] = "hit"
            self.index.touch_blob(str(digest))
            if request.method == hdrs.METH_GET:
                request["bytes"] = ("cache", _served_length(request, stat.st_size))
            # sendfile, Range and HEAD handled by aiohttp. Held from the stat on (no
            # await in between): eviction, on this loop too, then leaves the file alone.
            return CorkedFileResponse(
                path, chunk_size=CHUNK, headers={hdrs.CONTENT_TYPE: BLOB_TYPE, **headers}
            ).holding(self.readers.hold(str(digest)))

        request["result"] = "miss"
        fill = self.fills.get(digest)
        if request.method == hdrs.METH_HEAD and fill is None:
            upstream = await self.upstream.open_blob(
                route.registry, route.repository, str(digest), method="HEAD"
            )
            upstream.release()
            if upstream.content_length is not None:
                headers[hdrs.CONTENT_LENGTH] = str(upstream.content_length)
            return web.Response(headers={hdrs.CONTENT_TYPE: BLOB_TYPE, **headers})
        if fill is None:
            if self.fills.degraded():
                return await self._pass_through(request, route, digest, headers)
            fill = self.fills.start(digest, route.registry, route.repository)
        try:
            await fill.ready()
        except CacheUnavailable:
            return await self._pass_through(request, route, digest, headers)
        return await self._stream_fill(request, route, fill, headers)

    async def _pass_through(
        self, request: web.Request, route: Route, digest: Digest, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Stream a blob from upstream without caching it (the disk refused it).

        A whole blob is still verified: its last chunk is held back until the
        digest matches, so a wrong blob never reaches the client complete."""
        forward: dict[str, str] = {}
        if hdrs.RANGE in request.headers:
            forward["Range"] = request.headers[hdrs.RANGE]
        upstream = await self.upstream.open_blob(
            route.registry, route.repository, str(digest), request.method, forward
        )
        try:
            resp = web.StreamResponse(
                status=upstream.status, headers={hdrs.CONTENT_TYPE: BLOB_TYPE, **headers}
            )
            if upstream.content_length is not None:
                resp.content_length = upstream.content_length
            if hdrs.CONTENT_RANGE in upstream.headers:
                resp.headers[hdrs.CONTENT_RANGE] = upstream.headers[hdrs.CONTENT_RANGE]
            await resp.prepare(request)
            if request.method == hdrs.METH_HEAD:
                return resp
            verify = upstream.status == 200
            hasher = digest.hasher()
            held = b""
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    if verify:
                        hasher.update(chunk)
                    if held:
                        await resp.write(held)
                        self.metrics.bytes_served.labels("upstream").inc(len(held))
                    held = chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning(
                    "upstream failed during pass-through", digest=str(digest), error=str(exc)
                )
                self.upstream.blame_if_parent(upstream, f"blob {digest} cut short: {exc!r}")
                _abort(request)
                return resp
            if verify and hasher.hexdigest() != digest.hex:
                self.metrics.digest_mismatches.labels(route.registry).inc()
                log.warning("digest mismatch during pass-through", digest=str(digest))
                self.upstream.blame_if_parent(
                    upstream, f"blob {digest}: wrong bytes", mismatch=True
                )
                request["result"] = "error"
                _abort(request)
                return resp
            if held:
                await resp.write(held)
                self.metrics.bytes_served.labels("upstream").inc(len(held))
            await resp.write_eof()
            return resp
        except ConnectionResetError:
            return resp
        finally:
            upstream.release()

    async def _stream_fill(
        self, request: web.Request, route: Route, fill: Fill, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send a blob from a fill in progress, as far as it is written."""
        size = fill.size
        start, end = 0, size
        status = 200
        if size is not None and request.headers.get(hdrs.RANGE):
            try:
                rng = request.http_range
            except ValueError:
                rng = slice(None, None)
            if rng.start is not None or rng.stop is not None:
                start, stop = _resolve_range(rng, size)
                if start >= size or start >= stop:
                    raise _unsatisfiable(size)
                end = stop
                status = 206
                headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers={hdrs.CONTENT_TYPE: BLOB_TYPE, **headers})
        if end is not None:
            resp.content_length = end - start
        await resp.prepare(request)
        if request.method == hdrs.METH_HEAD:
            return resp
        assert fill.path is not None
        loop = asyncio.get_running_loop()
        # With a known length, the kernel copies the growing file to the socket
        # (sendfile); otherwise (chunked encoding) the bytes pass through here.
        transport = request.transport if end is not None else None
        file = open(fill.path, "rb")  # noqa: ASYNC230, SIM115 - local file, closed below
        reader = self.readers.hold(str(fill.digest))
        offset = start
        try:
            while end is None or offset < end:
                available = fill.readable()
                if end is not None:
                    available = min(available, end)
                if offset < available:
                    if transport is not None:
                        if transport.is_closing():
                            return resp
                        sent = await loop.sendfile(transport, file, offset, available - offset)
                    else:
                        data = os.pread(file.fileno(), min(CHUNK, available - offset), offset)
                        if not data:
                            break
                        await resp.write(data)
                        sent = len(data)
                    offset += sent
                    self.metrics.bytes_served.labels("upstream").inc(sent)
                    self.index.bump("bytes_from_upstream", sent)
                elif fill.error is not None:
                    if isinstance(fill.error, CacheUnavailable) and end is not None:
                        # The disk gave out mid-fill: finish this client from upstream.
                        await self._resume_upstream(request, resp, route, fill.digest, offset, end)
                        return resp
                    # Cut the connection: the client sees a short body and retries.
                    log.warning(
                        "fill failed under a client", digest=str(fill.digest), error=str(fill.error)
                    )
                    request["result"] = "error"
                    _abort(request)
                    return resp
                elif fill.verified:
                    break
                else:
                    await fill.wait()
        except ConnectionError:
            # The client left; the fill goes on for the others.
            log.info("client left during a fill", digest=str(fill.digest), sent=offset - start)
            return resp
        finally:
            file.close()
            reader.release()
        await resp.write_eof()
        return resp

    async def _resume_upstream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        route: Route,
        digest: Digest,
        offset: int,
        end: int,
    ) -> None:
        """Send bytes [offset, end) of a blob straight from upstream (Range)."""
        try:
            upstream = await self.upstream.open_blob(
                route.registry,
                route.repository,
                str(digest),
                headers={"Range": f"bytes={offset}-{end - 1}"},
            )
        except UpstreamError as exc:
            log.warning("cannot resume from upstream", digest=str(digest), error=str(exc))
            _abort(request)
            return
        try:
            if upstream.status != 206:
                raise aiohttp.ClientPayloadError(f"upstream answered {upstream.status} to Range")
            async for chunk in upstream.content.iter_chunked(CHUNK):
                chunk = chunk[: end - offset]
                offset += len(chunk)
                self.metrics.bytes_served.labels("upstream").inc(len(chunk))
                await resp.write(chunk)
            if offset != end:
                raise aiohttp.ClientPayloadError("upstream range ended early")
            await resp.write_eof()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("resuming from upstream failed", digest=str(digest), error=str(exc))
            self.upstream.blame_if_parent(upstream, f"blob {digest} cut short: {exc!r}")
            _abort(request)
        finally:
            upstream.release()

    # -- tags ----------------------------------------------------------------

    async def _tags(self, request: web.Request, route: Route) -> web.Response:
        try:
            query = urlencode([(k, v) for k, v in request.query.items() if k in ("n", "last")])
            _, content_type, body = await self.upstream.tags(
                route.registry, route.repository, query
            )
            request["result"] = "miss"
            headers = {hdrs.CONTENT_TYPE: content_type, **API_VERSION}
            # Upstreams that ignore n/last (Distribution 2.8) get them applied here.
            paged = page_tag_body(body, request.query.get("n"), request.query.get("last"))
            if paged is not None:
                body, page = paged
                headers.update(self._tag_link(request, page))
            return web.Response(body=body, headers=headers)
        except UpstreamUnavailable:
            tags = self.index.tags_of(route.registry, route.repository)
            if not tags:
                raise
            request["result"] = "stale"
            page = page_tags(tags, request.query.get("n"), request.query.get("last"))
            return web.json_response(
                {"name": route.repository, "tags": page.tags},
                headers={**API_VERSION, **self._tag_link(request, page)},
            )

    @staticmethod
    def _tag_link(request: web.Request, page: TagPage) -> dict[str, str]:
        link = next_link(request.raw_path.split("?", 1)[0], request.query, page)
        return {hdrs.LINK: link} if link else {}

    @staticmethod
    async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
        """Mirror-mode answers name the registry they came from, streamed ones too."""
        namespace = request.get("oci_namespace")
        if namespace:
            response.headers["OCI-Namespace"] = namespace

    # -- operations ----------------------------------------------------------

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self.metrics.cache_size.set(self.index.total_size())
        return exposition(self.metrics.registry)


class CorkedFileResponse(web.FileResponse):
    """A file body sent with TCP_CORK: full segments, as nginx sends them.

    aiohttp's sockets are TCP_NODELAY, which makes sendfile push many small
    segments; corking for the duration of the body is measurably faster."""

    _hold: Hold | None = None

    def holding(self, hold: Hold) -> CorkedFileResponse:
        """Count as a reader of the file until sent (or dropped unsent)."""
        self._hold = hold
        hold.tie(self)
        return self

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        corked = _cork(sock, True)
        try:
            return await super().prepare(_for_file_response(request))
        finally:
            if corked:
                _cork(sock, False)
            if self._hold is not None:
                self._hold.release()


def _for_file_response(request: web.BaseRequest) -> web.BaseRequest:
    """``request`` as aiohttp's file response should see it: a cached blob answers as one
    being filled does. Dropped: If-Match and If-Unmodified-Since, which a cache may ignore
    (RFC 9110 13.1.1, 13.1.4) and aiohttp would check against its own mtime ETag, answering
    a bodiless 412 (a blob never changes); and a Range aiohttp cannot parse (malformed,
    several ranges), which a fill ignores (RFC 9110 14.2) and aiohttp answers with 416."""
    drop = [h for h in (hdrs.IF_MATCH, hdrs.IF_UNMODIFIED_SINCE) if h in request.headers]
    if hdrs.RANGE in request.headers:
        try:
            _ = request.http_range
        except ValueError:
            drop.append(hdrs.RANGE)
    if not drop:
        return request
    # clone() re-encodes every header as UTF-8: a value carrying raw non-UTF-8 bytes
    # (kept by the parser as surrogates) cannot be, and no file response reads one.
    dropped = {name.lower() for name in drop}
    headers = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in dropped and _utf8(v)
    )
    return request.clone(headers=headers)


def _utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_cached_range(request: web.Request, stat: os.stat_result) -> None:
    """Refuse a Range starting at or past the end of a cached blob with OCI error JSON, as
    a blob being filled is refused, where aiohttp's file response would send an empty 416
    (unless If-Range, a date older than the file, says to ignore the Range)."""
    if hdrs.RANGE not in request.headers:
        return
    try:
        rng = request.http_range
    except ValueError:
        return  # ignored, see _for_file_response
    if_range = request.if_range
    if if_range is not None and stat.st_mtime > if_range.timestamp():
        return
    start, _ = _resolve_range(rng, stat.st_size)
    if start >= stat.st_size:
        raise _unsatisfiable(stat.st_size)


def _unsatisfiable(size: int) -> OCIError:
    return OCIError(
        416,
        "BLOB_UNKNOWN",
        "requested range not satisfiable",
        headers={hdrs.CONTENT_RANGE: f"bytes */{size}"},
    )


def _cork(sock: socket.socket | None, on: bool) -> bool:
    if sock is None or _TCP_CORK is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, int(on))
    except OSError:
        return False
    return True


def _abort(request: web.Request) -> None:
    """Cut the connection so the client sees a short body, never a complete wrong one."""
    if request.transport is not None:
        request.transport.abort()


def _parse_digest(value: str) -> Digest:
    try:
        return Digest.parse(value)
    except UnsupportedDigest as exc:
        raise OCIError(400, "DIGEST_INVALID", str(exc)) from exc
    except InvalidDigest as exc:
        raise OCIError(400, "DIGEST_INVALID", str(exc)) from exc


def _served_length(request: web.Request, size: int) -> int:
    if not request.headers.get(hdrs.RANGE):
        return size
    try:
        start, stop = _resolve_range(request.http_range, size)
    except ValueError:
        return size
    return max(0, stop - start)


def _resolve_range(rng: slice, size: int) -> tuple[int, int]:
    """aiohttp's single-range slice as [start, stop) within the blob."""
    start, stop = rng.start or 0, rng.stop
    if start < 0:  # suffix range "bytes=-N": the last N bytes
        return max(0, size + start), size
    return start, size if stop is None else min(stop, size)
