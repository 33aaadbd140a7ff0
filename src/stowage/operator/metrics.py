"""Prometheus metrics of the operator (GET /metrics on --metrics-listen)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)

from stowage.settings import split_listen

disable_created_metrics()  # type: ignore[no-untyped-call]


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.admissions = Counter(
            "stowage_operator_admissions",
            "Pods the webhook saw, by result (rewritten, unchanged, skipped).",
            ["result"],
            registry=self.registry,
        )
        self.prefetches = Counter(
            "stowage_operator_prefetches",
            "CachedImage prefetches through the cluster cache, by result (ok, failed).",
            ["result"],
            registry=self.registry,
        )
        self.tag_checks = Counter(
            "stowage_operator_tag_checks",
            "Tag freshness checks, by result (current, moved, failed).",
            ["result"],
            registry=self.registry,
        )
        self.expired = Counter(
            "stowage_operator_expired",
            "CachedImages deleted because no pod used them for --expiry.",
            registry=self.registry,
        )

    async def serve(self, listen: str) -> web.AppRunner:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = split_listen(listen)
        await web.TCPSite(runner, host, port).start()
        return runner
