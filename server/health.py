"""grpc.health.v1 statuses that tell the truth about the server.

Per service name and for the whole server (""):
- NOT_SERVING while starting (models loading and warming up) and from the moment draining begins;
- after startup, GenerationService is SERVING while at least one generation model's engine is alive,
  TranscriptionService while a speech model is loaded, ModelService always; "" is SERVING only while
  every served engine is alive.
A monitor task re-reads engine liveness every `poll_interval` seconds, so an engine that died turns
its service (and "") NOT_SERVING without any request having to notice.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from protoserve.server.registry import ModelRegistry, ServedGenerationModel, ServedSpeechModel

logger = logging.getLogger("protoserve.server.health")

GENERATION_SERVICE = "protoserve.v1.GenerationService"
TRANSCRIPTION_SERVICE = "protoserve.v1.TranscriptionService"
MODEL_SERVICE = "protoserve.v1.ModelService"
OVERALL = ""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Owns the health servicer and decides each service's status from the registry."""

    def __init__(self, poll_interval: float = 1.0) -> None:
        self.servicer = health_aio.HealthServicer()
        self._poll_interval = poll_interval
        self._registry: ModelRegistry | None = None
        self._draining = False
        self._monitor: asyncio.Task[None] | None = None
        self._statuses: dict[str, int] = {}

    async def mark_starting(self) -> None:
        """Every service NOT_SERVING (the aio servicer starts with "" SERVING)."""
        for service in (OVERALL, GENERATION_SERVICE, TRANSCRIPTION_SERVICE, MODEL_SERVICE):
            await self._set(service, NOT_SERVING)

    async def mark_ready(self, registry: ModelRegistry) -> None:
        """Models are loaded and warmed: report from the registry from now on, and keep watching."""
        self._registry = registry
        await self.refresh()
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def mark_draining(self) -> None:
        """NOT_SERVING everywhere, for good."""
        self._draining = True
        await self.stop_monitor()
        await self.servicer.enter_graceful_shutdown()
        self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
        logger.info("health: NOT_SERVING (draining)")

    def status(self, service: str = OVERALL) -> int:
        """The status last reported for `service` (a HealthCheckResponse.ServingStatus value)."""
        return self._statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def refresh(self) -> None:
        """Recompute every status from the registry's models and engines."""
        if self._draining or self._registry is None:
            return
        generation_alive: list[bool] = []
        speech_loaded = False
        for served in self._registry.served_models():
            if isinstance(served, ServedGenerationModel):
                try:
                    generation_alive.append(served.engine.stats().alive)
                except Exception:
                    logger.exception("reading the engine stats of %s failed", served.description.id)
                    generation_alive.append(False)
            elif isinstance(served, ServedSpeechModel):
                speech_loaded = True
        await self._set(GENERATION_SERVICE, SERVING if any(generation_alive) else NOT_SERVING)
        await self._set(TRANSCRIPTION_SERVICE, SERVING if speech_loaded else NOT_SERVING)
        await self._set(MODEL_SERVICE, SERVING)
        await self._set(OVERALL, SERVING if all(generation_alive) else NOT_SERVING)

    async def _set(self, service: str, status: int) -> None:
        if self._statuses.get(service) != status:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)  # type: ignore[arg-type]
            logger.info("health: %s %s", service or "(server)", name)
        self._statuses[service] = status
        await self.servicer.set(service, status)  # type: ignore[arg-type]

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.refresh()
            except Exception:
                logger.exception("refreshing health failed")

    async def stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
