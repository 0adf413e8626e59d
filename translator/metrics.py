"""Prometheus metrics of one translator app, in their own registry (so many apps can live in one
process, as in tests): HTTP requests by route and status, latency, in-flight streams, upstream errors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

UNMATCHED_ROUTE = "unmatched"  # label of requests no route matched, so bad paths add no label values


class TranslatorMetrics:
    """The counters the middlewares and routes update, and their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "protoserve_translator_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "protoserve_translator_http_request_duration_seconds",
            "Time from request to the end of the response (whole stream for SSE), by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.streams_in_flight = Gauge(
            "protoserve_translator_streams_in_flight",
            "SSE responses being streamed now.",
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "protoserve_translator_upstream_errors",
            "Failed upstream gRPC calls, by gRPC status code.",
            ["code"],
            registry=self.registry,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
