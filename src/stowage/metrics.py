"""Prometheus exposition shared by every command: one text format, no ``*_created``
series (a counter's start time is noise on every scrape), one small server for the
commands that have no HTTP app of their own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # type: ignore[no-untyped-call]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_registry() -> CollectorRegistry:
    """A registry for a command's metrics (through here, so none has ``*_created``)."""
    return CollectorRegistry()


def exposition(registry: CollectorRegistry) -> web.Response:
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, extra: Mapping[str, Handler] = {}
) -> web.AppRunner:
    """GET /metrics of ``registry`` (and the ``extra`` GET routes) on ``host:port``."""

    async def metrics(_: web.Request) -> web.Response:
        return exposition(registry)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    for path, handler in extra.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
