"""Building, starting and stopping the grpc.aio server.

`start_server` binds the listeners first (health answers NOT_SERVING, other calls UNAVAILABLE while
models load), then loads and warms every model, then opens the gate and reports SERVING. The
returned `RunningServer` drains on `stop(grace)`: health NOT_SERVING, new calls UNAVAILABLE,
in-flight calls get up to `grace` seconds, then the listener closes and the engines stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from protoserve.server.auth import ApiKeyChecker, ApiKeyInterceptor
from protoserve.server.config import ServerConfig
from protoserve.server.health import HealthReporter
from protoserve.server.lifecycle import GateInterceptor, ServingGate, ServingState
from protoserve.server.metrics import MetricsHttpServer, ServerMetrics
from protoserve.server.model_loading import warm_up
from protoserve.server.registry import ModelRegistry
from protoserve.server.request_log import RequestLogInterceptor
from protoserve.server.services.models import ModelServicer
from protoserve.server.services.transcription import TranscriptionServicer
from protoserve.server.tls import server_credentials
from protoserve.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    transcription_pb2,
    transcription_pb2_grpc,
)

logger = logging.getLogger("protoserve.server.app")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEALTH_WATCH_GRACE_SECONDS = 0.5

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    transcription_pb2.DESCRIPTOR.services_by_name["TranscriptionService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


@dataclass
class RunningServer:
    """A started server. `addresses` are what clients dial (`host:port`, `unix:/path`)."""

    server: grpc.aio.Server
    config: ServerConfig
    registry: ModelRegistry
    metrics: ServerMetrics
    health: HealthReporter
    gate: ServingGate
    addresses: list[str]
    ports: list[int]  # TCP ports actually bound (a requested port 0 becomes a free port)
    metrics_http: MetricsHttpServer | None = None
    _stopping: asyncio.Task[None] | None = field(default=None, repr=False)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.port if self.metrics_http is not None else None

    async def drain(self, grace: float) -> None:
        """Stop taking calls and give in-flight ones up to `grace` seconds; then stop everything.
        Calling it again while a drain runs waits for that drain (use `abort` to cut it short)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain(grace))
        await asyncio.shield(self._stopping)

    stop = drain

    async def _drain(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        self.gate.close()
        await self.health.mark_draining()
        logger.info("draining: %d calls in flight, up to %.1fs", self.gate.in_flight, grace)
        finished = await self.gate.wait_idle(grace)
        if not finished:
            logger.warning("drain grace ran out with %d calls in flight; cancelling them", self.gate.in_flight)
        # Only health and reflection calls can remain (a health Watch never ends by itself): give
        # them a moment to see NOT_SERVING, not the whole grace.
        await self.server.stop(min(max(deadline - time.monotonic(), 0.0), HEALTH_WATCH_GRACE_SECONDS))
        await self._release()

    async def abort(self) -> None:
        """Stop at once: in-flight calls are cancelled."""
        self.gate.close()
        await self.health.mark_draining()
        if self._stopping is not None and not self._stopping.done():
            self._stopping.cancel()
        await self.server.stop(None)
        await self._release()

    async def _release(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.stop_monitor()
        await self.registry.shutdown()
        if self.metrics_http is not None:
            self.metrics_http.close()
        logger.info("server stopped")

    async def wait(self) -> None:
        """Until the server has stopped (after `drain`/`abort`) and its models are released."""
        await self._stopped.wait()


def _interceptors(config: ServerConfig, gate: ServingGate) -> list[grpc.aio.ServerInterceptor]:
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestLogInterceptor()]
    if config.api_keys:
        interceptors.append(ApiKeyInterceptor(ApiKeyChecker(config.api_keys)))
    interceptors.append(GateInterceptor(gate))
    return interceptors


def _bind(server: grpc.aio.Server, config: ServerConfig) -> tuple[list[str], list[int]]:
    credentials = server_credentials(config.tls) if config.tls is not None else None
    addresses, ports = [], []
    for address in config.addresses:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if address.startswith("unix:"):
            addresses.append(address)
        else:
            if port == 0:
                raise OSError(f"cannot listen on {address}")
            ports.append(port)
            addresses.append(f"{address.rsplit(':', 1)[0]}:{port}")
    return addresses, ports


def _generation_servicer(registry: ModelRegistry, config: ServerConfig, metrics: ServerMetrics) -> Any:
    from protoserve.server.services.generation import GenerationServicer

    return GenerationServicer(registry, config, metrics)


# Connections are recycled (GOAWAY) after five minutes, so clients balancing over a headless Service
# re-resolve and reach replicas added since; streams in flight get half an hour to finish. Clients ping
# every 30 s during a call (client/channel.py): a request that waits in the queue with no data flowing
# must not be cut off as "too many pings", so pings every 20 s are allowed.
CONNECTION_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 30 * 60 * 1000),
    ("grpc.http2.min_ping_interval_without_data_ms", 20 * 1000),
)


async def start_server(
    config: ServerConfig,
    registry: ModelRegistry | None = None,
    *,
    metrics: ServerMetrics | None = None,
    generation_servicer: generation_pb2_grpc.GenerationServiceServicer | None = None,
) -> RunningServer:
    """Start listening, load and warm the models, then report SERVING. See the module docstring.

    `registry` defaults to one built from `config.models`; `generation_servicer` to
    `GenerationServicer(registry, config, metrics)` (tests pass fakes of both).
    """
    metrics = metrics or ServerMetrics()
    registry = registry or ModelRegistry.from_config(config)
    gate = ServingGate()
    health = HealthReporter()
    server = grpc.aio.server(
        interceptors=_interceptors(config, gate),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            *CONNECTION_OPTIONS,
        ],
    )
    if generation_servicer is None:
        generation_servicer = _generation_servicer(registry, config, metrics)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(generation_servicer, server)
    transcription_pb2_grpc.add_TranscriptionServiceServicer_to_server(
        TranscriptionServicer(registry, config, metrics), server
    )
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    await health.mark_starting()
    addresses, ports = _bind(server, config)
    await server.start()
    running = RunningServer(server, config, registry, metrics, health, gate, addresses, ports)
    try:
        if config.metrics_port is not None:
            running.metrics_http = metrics.serve_http(config.metrics_host, config.metrics_port)
        metrics.watch_engines(registry.engine_stats)
        await registry.load_startup_models()
        if config.warm_up:
            for served in registry.served_models():
                await warm_up(served)
    except BaseException:
        await running.abort()
        raise
    if gate.state is ServingState.STARTING:
        gate.open()
        await health.mark_ready(registry)
        logger.info("serving on %s", ", ".join(addresses))
    return running
