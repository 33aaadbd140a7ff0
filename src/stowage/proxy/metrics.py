"""Prometheus metrics of one proxy instance."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from stowage.metrics import new_registry
from stowage.upstream.parent import RESULTS as PARENT_RESULTS


class Metrics:
    def __init__(self) -> None:
        self.registry = new_registry()
        self.requests = Counter(
            "stowage_requests",
            "Requests answered, by route and result (hit, miss, stale, error).",
            ["route", "result"],
            registry=self.registry,
        )
        self.bytes_served = Counter(
            "stowage_bytes_served",
            "Bytes of manifests and blobs sent to clients, by source (cache, upstream).",
            ["source"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "stowage_upstream_requests",
            "Requests sent to upstream registries, by registry and status "
            "(HTTP status, or timeout/unreachable/error).",
            ["registry", "status"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "stowage_upstream_errors",
            "Upstream failures, by registry and reason.",
            ["registry", "reason"],
            registry=self.registry,
        )
        self.fills_in_flight = Gauge(
            "stowage_fills_in_flight",
            "Blob downloads from upstream in progress.",
            registry=self.registry,
        )
        self.cache_size = Gauge(
            "stowage_cache_size_bytes",
            "Bytes of verified content in the cache.",
            registry=self.registry,
        )
        self.digest_mismatches = Counter(
            "stowage_digest_mismatches",
            "Upstream content rejected because it did not match its digest.",
            ["registry"],
            registry=self.registry,
        )
        self.evictions = Counter(
            "stowage_evictions",
            "Images evicted (least recently used first) to keep the cache under --max-size.",
            registry=self.registry,
        )
        self.gc_runs = Counter(
            "stowage_gc_runs",
            "Garbage-collection and eviction cycles run.",
            registry=self.registry,
        )
        self.reclaimed = Counter(
            "stowage_reclaimed_bytes",
            "Bytes of cached content deleted, by reason (evict, gc).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("evict", "gc"):
            self.reclaimed.labels(reason)
        self.parent_requests = Counter(
            "stowage_parent_requests",
            "Requests for the parent stowage (--parent), by result: ok (its answer used), "
            "private (it refused anonymous access: the registry was asked with our "
            "credentials), fallback (unreachable or failing: the registry was asked, the "
            "parent backed off), skipped (backing off: the registry was asked), mismatch "
            "(content it sent failed verification).",
            ["result"],
            registry=self.registry,
        )

    def on_parent(self, result: str) -> None:
        self.parent_requests.labels(result).inc()

    def show_parent(self) -> None:
        """Make every result appear (at 0) on /metrics: a parent is configured."""
        for result in PARENT_RESULTS:
            self.parent_requests.labels(result)

    def on_upstream(self, registry: str, status: str) -> None:
        self.upstream_requests.labels(registry, status).inc()
        if not status.isdigit() or int(status) >= 500 or status == "429":
            self.upstream_errors.labels(registry, status).inc()
