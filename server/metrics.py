"""Prometheus metrics: request counts and latencies from the servicers, engine gauges at scrape time.

`ServerMetrics` owns its own `CollectorRegistry` (never the process-global one, so tests and
several servers in one process do not collide). Servicers call `request_started`,
`request_finished`, `first_token`, `inter_token` and `tokens`; the engine's state (queue depth,
requests pending admission, running requests, KV blocks, prefix-cache hit rate) is read from
`engine.stats()` of every loaded model each time the endpoint is scraped, by a custom collector, so
it is never stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from protoserve.server.engine.api import EngineStats
from protoserve.server.interceptors import Context
from protoserve.server.request_log import note_model, note_tokens, status_name

logger = logging.getLogger("protoserve.server.metrics")

EngineStatsSource = Callable[[], Mapping[str, EngineStats]]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineStatsCollector(Collector):
    """Reads every engine's `stats()` at scrape time and reports them as gauges labelled by model."""

    def __init__(self, source: EngineStatsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        families = {
            "running": GaugeMetricFamily(
                "protoserve_engine_running_requests", "Requests in the engine's running batch", labels=["model"]
            ),
            "waiting": GaugeMetricFamily(
                "protoserve_engine_queue_depth", "Requests waiting to be scheduled", labels=["model"]
            ),
            "pending": GaugeMetricFamily(
                "protoserve_engine_pending_requests",
                "Requests accepted but not yet handed to the scheduler (not in the queue depth)",
                labels=["model"],
            ),
            "blocks_used": GaugeMetricFamily(
                "protoserve_kv_cache_blocks_used", "KV-cache blocks in use", labels=["model"]
            ),
            "blocks_total": GaugeMetricFamily(
                "protoserve_kv_cache_blocks_total", "KV-cache blocks in all", labels=["model"]
            ),
            "hit_rate": GaugeMetricFamily(
                "protoserve_prefix_cache_hit_rate",
                "Share of looked-up prompt tokens found in the prefix cache since start",
                labels=["model"],
            ),
            "preemptions": GaugeMetricFamily(
                "protoserve_engine_preemptions", "Sequences preempted since start", labels=["model"]
            ),
            "drafts": GaugeMetricFamily(
                "protoserve_speculative_draft_tokens", "Speculative draft tokens run since start", labels=["model"]
            ),
            "accepted": GaugeMetricFamily(
                "protoserve_speculative_accepted_tokens",
                "Speculative draft tokens the model agreed with since start",
                labels=["model"],
            ),
            "alive": GaugeMetricFamily("protoserve_engine_alive", "1 while the engine loop runs", labels=["model"]),
        }
        try:
            snapshot = dict(self._source())
        except Exception:  # a scrape must never fail because one engine misbehaves
            logger.exception("reading engine stats for metrics failed")
            snapshot = {}
        for model, stats in snapshot.items():
            hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
            families["running"].add_metric([model], stats.running_requests)
            families["waiting"].add_metric([model], stats.waiting_requests)
            families["pending"].add_metric([model], stats.pending_requests)
            families["blocks_used"].add_metric([model], stats.kv_blocks_used)
            families["blocks_total"].add_metric([model], stats.kv_blocks_total)
            families["hit_rate"].add_metric([model], hit_rate)
            families["preemptions"].add_metric([model], stats.preemptions)
            families["drafts"].add_metric([model], stats.draft_tokens)
            families["accepted"].add_metric([model], stats.accepted_draft_tokens)
            families["alive"].add_metric([model], 1.0 if stats.alive else 0.0)
        yield from families.values()


@dataclass
class MetricsHttpServer:
    """The running `/metrics` endpoint."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class ServerMetrics:
    """The server's metrics, in a registry of their own. Every method is cheap and never raises."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "protoserve_requests", "Finished requests by model, rpc and status code",
            ["model", "rpc", "code"], registry=self.registry,
        )
        self._in_progress = Gauge(
            "protoserve_requests_in_progress", "Requests being served", ["model", "rpc"], registry=self.registry
        )
        self._prompt_tokens = Counter(
            "protoserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self._completion_tokens = Counter(
            "protoserve_completion_tokens", "Tokens generated", ["model"], registry=self.registry
        )
        self._time_to_first_token = Histogram(
            "protoserve_time_to_first_token_seconds", "Time from request to its first generated token",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self._inter_token = Histogram(
            "protoserve_inter_token_latency_seconds", "Time between consecutive generated tokens",
            ["model"], buckets=_INTER_TOKEN_BUCKETS, registry=self.registry,
        )
        self._duration = Histogram(
            "protoserve_request_duration_seconds", "Request duration by model and rpc",
            ["model", "rpc"], buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        self._engine_collector: EngineStatsCollector | None = None

    def watch_engines(self, source: EngineStatsSource) -> None:
        """Report engine gauges from `source()` (model id -> stats) at every scrape."""
        if self._engine_collector is not None:
            self.registry.unregister(self._engine_collector)
        self._engine_collector = EngineStatsCollector(source)
        self.registry.register(self._engine_collector)

    def request_started(self, model: str, rpc: str) -> None:
        self._in_progress.labels(model=model, rpc=rpc).inc()
        note_model(model)

    def request_finished(self, model: str, rpc: str, code: str, duration_seconds: float | None = None) -> None:
        """`code` is the status name, e.g. "OK" or "INVALID_ARGUMENT". Pairs with `request_started`."""
        self._in_progress.labels(model=model, rpc=rpc).dec()
        self._requests.labels(model=model, rpc=rpc, code=code).inc()
        if duration_seconds is not None:
            self._duration.labels(model=model, rpc=rpc).observe(duration_seconds)

    @asynccontextmanager
    async def observe(self, model: str, rpc: str, context: Context) -> AsyncIterator[None]:
        """`request_started` now and `request_finished` with the call's status and duration at the end."""
        self.request_started(model, rpc)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.request_finished(model, rpc, status_name(context, error), time.monotonic() - started)

    def first_token(self, model: str, seconds: float) -> None:
        self._time_to_first_token.labels(model=model).observe(seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        self._inter_token.labels(model=model).observe(seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        self._prompt_tokens.labels(model=model).inc(max(prompt, 0))
        self._completion_tokens.labels(model=model).inc(max(completion, 0))
        note_tokens(prompt, completion)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int) -> MetricsHttpServer:
        """Serve `/metrics` on host:port (port 0 picks a free one) from a background thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsHttpServer(server, thread)
