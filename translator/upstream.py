"""The translator's gRPC side: one channel, the stubs, metadata, and error mapping in one place.

`stream` and `unary` turn grpc.aio errors into ApiError (counted in the metrics) and cancel the
upstream call as soon as the handler is cancelled (client disconnect) or stops reading early.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1.health_pb2_grpc import HealthStub
from protoserve.client.channel import api_key_metadata, create_async_channel
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.errors import api_error_from_rpc_error
from protoserve.translator.metrics import TranslatorMetrics
from protoserve.v1.generation_pb2_grpc import GenerationServiceStub
from protoserve.v1.models_pb2_grpc import ModelServiceStub
from protoserve.v1.transcription_pb2_grpc import TranscriptionServiceStub

Message = TypeVar("Message")


@dataclass(frozen=True)
class CallOptions:
    """Per-call settings: the request id, metadata (API key, request id) and the deadline in seconds."""

    request_id: str
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None


@dataclass
class Upstream:
    """The channel and stubs to the protoserve server; created inside the running event loop."""

    channel: grpc.aio.Channel
    generation: GenerationServiceStub
    models: ModelServiceStub
    transcription: TranscriptionServiceStub
    health: HealthStub
    api_key: str | None
    metrics: TranslatorMetrics

    @classmethod
    def open(cls, config: TranslatorConfig, metrics: TranslatorMetrics) -> Upstream:
        channel = create_async_channel(config.upstream, tls=config.upstream_tls)
        return cls(
            channel=channel,
            generation=GenerationServiceStub(channel),
            models=ModelServiceStub(channel),
            transcription=TranscriptionServiceStub(channel),
            health=HealthStub(channel),
            api_key=config.upstream_api_key,
            metrics=metrics,
        )

    async def close(self) -> None:
        await self.channel.close(grace=None)

    def call_options(self, request_id: str, timeout: float | None) -> CallOptions:
        metadata = (*api_key_metadata(self.api_key), ("x-request-id", request_id))
        return CallOptions(request_id=request_id, metadata=tuple(metadata), timeout=timeout)

    def _mapped(self, error: grpc.aio.AioRpcError) -> Exception:
        self.metrics.upstream_errors.labels(code=error.code().name).inc()
        return api_error_from_rpc_error(error)

    async def unary(self, call: Awaitable[Message]) -> Message:
        """The reply of a unary call, or an ApiError; cancels the call if the handler is cancelled."""
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise self._mapped(error) from None
        except asyncio.CancelledError:
            _cancel(call)
            raise

    async def stream(self, call: Any) -> AsyncGenerator[Any, None]:
        """The messages of a server-streaming call, mapping errors; the call is cancelled when the
        consumer is cancelled or closes this iterator before the end."""
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            raise self._mapped(error) from None
        finally:
            _cancel(call)


def _cancel(call: Any) -> None:
    if isinstance(call, grpc.aio.Call) and not call.done():
        call.cancel()
