"""Prometheus metrics, served on the admin port at /metrics.

Each server gets its own registry, so several servers in one process (tests) never
share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "apipool_requests",
            "Proxied /v1 requests by endpoint, model and status.",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "apipool_upstream_attempts",
            "Requests sent to upstream keys (one per attempt).",
            registry=self.registry,
        )
        self.failovers = Counter(
            "apipool_failovers",
            "Attempts that moved a request on to another key.",
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "apipool_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "apipool_requests_in_flight", "Proxied requests being served.", registry=self.registry
        )

    def watch(self, name: str, doc: str, label: str, read: Callable[[], dict[str, float]]) -> None:
        """Export a gauge family whose values are read at scrape time."""
        self.registry.register(_Snapshot(name, doc, label, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot(Collector):
    def __init__(
        self, name: str, doc: str, label: str, read: Callable[[], dict[str, float]]
    ) -> None:
        self.name, self.doc, self.label, self.read = name, doc, label, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.doc, labels=[self.label] if self.label else [])
        for value_label, value in self.read().items():
            family.add_metric([value_label] if self.label else [], value)
        yield family

    def describe(self) -> list[GaugeMetricFamily]:
        return []
