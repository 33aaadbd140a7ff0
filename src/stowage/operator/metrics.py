"""Prometheus metrics of the operator (GET /metrics on --metrics-listen)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import Counter

from stowage.metrics import new_registry, serve_metrics
from stowage.settings import split_listen


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = new_registry()
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
        return await serve_metrics(self.registry, *split_listen(listen))
