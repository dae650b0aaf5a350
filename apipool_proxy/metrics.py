"""Prometheus metrics, served on the admin port at /metrics.

The request path only bumps plain integers (no locks, no label lookups: the process has
one event loop thread); a collector turns them into Prometheus families when /metrics is
scraped. Each server has its own registry, so servers in one process never share counts.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        # (endpoint, model, status) -> proxied /v1 requests
        self.requests: dict[tuple[str, str, str], int] = {}
        self.attempts = 0  # requests sent to upstream keys, one per attempt
        self.failovers = 0  # attempts that moved a request on to another key
        self.in_flight = 0  # proxied requests being served
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._gauges: list[tuple[str, str, str, Callable[[], dict[str, float]]]] = []
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Exporter(self))

    def count_request(self, endpoint: str, model: str, status: int) -> None:
        labels = (endpoint, model, str(status))
        self.requests[labels] = self.requests.get(labels, 0) + 1

    def observe_upstream_latency(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def watch(self, name: str, doc: str, label: str, read: Callable[[], dict[str, float]]) -> None:
        """Export a gauge family whose values are read at scrape time."""
        self._gauges.append((name, doc, label, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "apipool_requests",
            "Proxied /v1 requests by endpoint, model and status.",
            labels=["endpoint", "model", "status"],
        )
        for labels, count in sorted(self.requests.items()):
            requests.add_metric(list(labels), count)
        yield requests
        yield CounterMetricFamily(
            "apipool_upstream_attempts",
            "Requests sent to upstream keys (one per attempt).",
            value=self.attempts,
        )
        yield CounterMetricFamily(
            "apipool_failovers",
            "Attempts that moved a request on to another key.",
            value=self.failovers,
        )
        yield self._latency_family()
        yield GaugeMetricFamily(
            "apipool_requests_in_flight", "Proxied requests being served.", value=self.in_flight
        )
        for name, doc, label, read in self._gauges:
            family = GaugeMetricFamily(name, doc, labels=[label] if label else [])
            for value_label, value in read().items():
                family.add_metric([value_label] if label else [], value)
            yield family

    def _latency_family(self) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(LATENCY_BUCKETS, self.latency_counts, strict=False):
            running += count
            buckets.append((str(float(bound)), running))
        buckets.append(("+Inf", running + self.latency_counts[-1]))
        return HistogramMetricFamily(
            "apipool_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            buckets=buckets,
            sum_value=self.latency_sum,
        )


class _Exporter(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families()

    def describe(self) -> list[Metric]:
        return []
