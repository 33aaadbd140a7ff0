"""Assemble the proxy from settings and run it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import sqlite3
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from stowage.proxy.admin import Admin, read_token
from stowage.proxy.app import Proxy, ProxyConfig
from stowage.proxy.badrequests import quiet_bad_requests
from stowage.proxy.errors import OCIError
from stowage.proxy.metrics import Metrics
from stowage.settings import Settings
from stowage.store.gc import Bounds, Collector, GCConfig, Hooks
from stowage.store.reindex import open_cache
from stowage.upstream.auth import load_auth_file
from stowage.upstream.client import Upstream, UpstreamConfig

log = structlog.get_logger("stowage.server")

FLUSH_INTERVAL = 5.0
M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h
STAT_OF_RESULT = {"hit": "hits", "miss": "misses", "stale": "stale", "error": "errors"}


def build_app(settings: Settings) -> web.Application:
    credentials = load_auth_file(settings.auth_file) if settings.auth_file else {}
    # An index that is lost or unreadable is rebuilt from the files (with a warning).
    store, index, _ = open_cache(settings.data)
    try:
        swept = store.sweep_temp()
        dropped, adopted = index.reconcile(store)
    except (OSError, sqlite3.Error) as exc:
        log.warning("cache not reconciled (read-only?)", error=str(exc))
        swept = dropped = adopted = 0
    log.info(
        "cache opened",
        data=str(settings.data),
        size=index.total_size(),
        temp_files_swept=swept,
        rows_dropped=dropped,
        blobs_adopted=adopted,
    )
    metrics = Metrics()
    upstream = Upstream(
        UpstreamConfig(
            insecure=frozenset(settings.insecure_registry),
            credentials=credentials,
            ca_file=settings.ca_file,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            parent=settings.parent,
        ),
        metrics.on_upstream,
        metrics.on_parent,
    )
    if settings.parent:
        metrics.show_parent()
    known = frozenset({*settings.insecure_registry, *credentials, settings.default_registry})
    proxy = Proxy(
        ProxyConfig(
            settings.default_registry,
            settings.tag_ttl,
            settings.revalidate_timeout,
            known,
            cache_retry=settings.cache_retry,
            auth_cache_ttl=settings.auth_cache_ttl,
        ),
        store,
        index,
        upstream,
        metrics,
    )
    quiet_bad_requests()  # requests aiohttp's parser refuses: one line, no traceback
    app = web.Application(middlewares=[_middleware(proxy)])
    app.router.add_route("*", "/v2", proxy.handle_v2)
    app.router.add_route("*", "/v2/{tail:.*}", proxy.handle_v2)
    token = read_token(settings.admin_token_file) if settings.admin_token_file else None
    Admin(index, token).routes(app)
    app.router.add_get("/metrics", proxy.metrics_handler)
    app.router.add_get("/healthz", _ok)
    app.router.add_get("/readyz", _ok)
    app.on_response_prepare.append(proxy.on_response_prepare)
    app.cleanup_ctx.append(_lifecycle(proxy))
    app.cleanup_ctx.append(_bounded_cache(proxy, settings))
    return app


def _lifecycle(proxy: Proxy):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await proxy.upstream.start()
        flusher = asyncio.create_task(_flush_periodically(proxy))
        yield
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await proxy.fills.close()
        await proxy.upstream.close()
        proxy.index.close()

    return ctx


def _bounded_cache(proxy: Proxy, settings: Settings):  # type: ignore[no-untyped-def]
    """Eviction over --max-size and garbage collection, as a background task."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        bounds = None
        if settings.size_limit is not None:
            try:
                limit = settings.size_limit.resolve(settings.data)
            except OSError as exc:
                log.warning("--max-size not applied", error=str(exc))
            else:
                bounds = Bounds(limit, settings.high_watermark, settings.low_watermark)
        metrics = proxy.metrics
        collector = Collector(
            proxy.store,
            proxy.index,
            GCConfig(bounds, settings.gc_interval, settings.gc_grace),
            proxy.readers,
            Hooks(
                on_run=metrics.gc_runs.inc,
                on_evicted=metrics.evictions.inc,
                on_reclaimed=lambda reason, n: metrics.reclaimed.labels(reason).inc(n),
                on_size=metrics.cache_size.set,
            ),
        )
        task = None
        if collector.open():
            log.info(
                "bounded cache",
                max_size=bounds and bounds.limit,
                high_watermark=bounds and bounds.high_bytes,
                low_watermark=bounds and bounds.low_bytes,
                gc_interval=settings.gc_interval,
                gc_grace=settings.gc_grace,
            )
            proxy.fills.on_commit = collector.poke
            task = asyncio.create_task(collector.run())
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        collector.close()

    return ctx


async def _flush_periodically(proxy: Proxy) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        try:
            proxy.index.flush()
        except Exception as exc:  # a busy or full disk must not stop serving
            log.warning("index flush failed", error=str(exc))


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def _middleware(proxy: Proxy):  # type: ignore[no-untyped-def]
    metrics, index = proxy.metrics, proxy.index

    @web.middleware
    async def middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            resp = await handler(request)
        except OCIError as exc:
            resp = exc.response()
        except web.HTTPException as exc:
            if exc.status == 404:
                resp = OCIError(404, "NOT_FOUND", f"no route for {request.path}").response()
            elif exc.status == 405:
                allow = {"Allow": exc.headers.get("Allow", "GET, HEAD")}
                resp = OCIError(
                    405, "UNSUPPORTED", f"{request.method} not allowed", allow
                ).response()
            else:
                raise
        except (asyncio.CancelledError, ConnectionResetError):
            _log_request(request, 499, start)
            raise
        except Exception:
            log.exception("unhandled error", method=request.method, path=request.path)
            resp = OCIError(500, "UNKNOWN", "internal error; see the stowage log").response()
        route = request.get("route")
        if route is not None:
            result = request.get("result") or ("error" if resp.status >= 400 else "ok")
            if resp.status >= 400 and route != "base":
                result = "error"
            metrics.requests.labels(route, result).inc()
            if result in STAT_OF_RESULT:
                index.bump(STAT_OF_RESULT[result])
            request["result"] = result
        if request.method == "GET" and resp.status in (200, 206) and "bytes" in request:
            source, amount = request["bytes"]
            metrics.bytes_served.labels(source).inc(amount)
            index.bump(f"bytes_from_{source}", amount)
        _log_request(request, resp.status, start)
        return resp

    return middleware


def _log_request(request: web.Request, status: int, start: float) -> None:
    log.info(
        "request",
        method=request.method,
        path=request.path,
        ns=request.query.get("ns"),
        status=status,
        result=request.get("result"),
        duration_ms=round((time.perf_counter() - start) * 1000, 2),
        remote=request.remote,
    )


def _steady_malloc() -> None:
    """Keep RSS flat however large the blobs: glibc raises its mmap threshold
    after large frees, after which every 1 MiB read buffer comes from the
    heap and stays there. A fixed threshold returns such buffers at once."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)


def run(settings: Settings) -> None:
    _steady_malloc()
    host, port = settings.host_port
    app = build_app(settings)
    log.info(
        "serving",
        listen=settings.listen,
        default_registry=settings.default_registry,
        tag_ttl=settings.tag_ttl,
        parent=settings.parent,
    )
    web.run_app(app, host=host, port=port, access_log=None, print=None)
