"""Fakes for the server-runtime tests: engines, speech models, a minimal generation servicer, and a
helper that runs a real grpc.aio server on a free loopback port with them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import grpc.aio
from protoserve.server.app import RunningServer, start_server
from protoserve.server.config import ServerConfig
from protoserve.server.engine.api import (
    CompletionDelta,
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestOutput,
    Usage,
)
from protoserve.server.errors import rpc_errors
from protoserve.server.metrics import ServerMetrics
from protoserve.server.registry import (
    ModelDescription,
    ModelRegistry,
    ServedGenerationModel,
    ServedModel,
    ServedSpeechModel,
)
from protoserve.server.transcription.contract import DoneEvent, Segment, SegmentEvent, TranscribeOptions
from protoserve.v1 import generation_pb2, generation_pb2_grpc


def description(model_id: str, *, speech: bool = False) -> ModelDescription:
    return ModelDescription(
        id=model_id,
        owned_by="protoserve",
        created=1_700_000_000,
        modalities=("audio",) if speech else ("text",),
        context_length=448 if speech else 2048,
        quantization="none",
        loaded=True,
        architecture="WhisperForConditionalGeneration" if speech else "LlamaForCausalLM",
        dtype="float32",
        device="cpu",
        capabilities=("transcribe",) if speech else ("generate", "chat"),
    )


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def encode(self, text: str) -> list[int]:
        return [ord(character) % 100 for character in text]


@dataclass
class FakeLoaded:
    tokenizer: Any = field(default_factory=FakeTokenizer)
    processor: Any = None
    eos_token_ids: frozenset[int] = frozenset({0})


class FakeEngine:
    """Streams `tokens_per_request` one-token outputs, `step_delay` apart; or raises `error`."""

    def __init__(self, *, tokens_per_request: int = 3, step_delay: float = 0.0, error: Exception | None = None):
        self.tokens_per_request = tokens_per_request
        self.step_delay = step_delay
        self.error = error
        self.alive = True
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.running = 0
        self.shut_down = False

    @property
    def context_length(self) -> int:
        return 2048

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise self.error
        self.requests.append(request)
        self.running += 1
        try:
            count = 1 if request.params.max_tokens == 1 else self.tokens_per_request
            for step in range(count):
                await asyncio.sleep(self.step_delay)
                last = step == count - 1
                delta = CompletionDelta(
                    index=0, text=f"t{step} ", token_ids=(step,), finish_reason=FinishReason.LENGTH if last else None
                )
                usage = Usage(len(request.prompt_token_ids), count) if last else None
                yield RequestOutput(request.request_id, (delta,), finished=last, usage=usage)
        except (asyncio.CancelledError, GeneratorExit):
            self.abort(request.request_id)
            raise
        finally:
            self.running -= 1

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            running_requests=self.running,
            waiting_requests=0,
            kv_blocks_total=100,
            kv_blocks_used=7,
            prefix_cache_queries=10,
            prefix_cache_hits=4,
            preemptions=0,
            steps=3,
            alive=self.alive,
            draft_tokens=12,
            accepted_draft_tokens=5,
        )

    async def shutdown(self) -> None:
        self.shut_down = True


class FakeSpeechModel:
    """Yields one SegmentEvent per `windows`, `window_delay` apart, then a DoneEvent."""

    def __init__(self, *, windows: int = 2, window_delay: float = 0.0, error: Exception | None = None):
        self.windows = windows
        self.window_delay = window_delay
        self.error = error
        self.calls: list[tuple[bytes, TranscribeOptions]] = []
        self.closed_early = False

    async def transcribe(self, audio: bytes, options: TranscribeOptions) -> AsyncIterator[Any]:
        self.calls.append((audio, options))
        if self.error is not None:
            raise self.error
        finished = False
        try:
            for window in range(self.windows):
                await asyncio.sleep(self.window_delay)
                segment = Segment(window, window * 30.0, window * 30.0 + 2.5, f" part {window}.", (1, 2), -0.25)
                yield SegmentEvent((segment,))
            finished = True
            yield DoneEvent(" ".join(f"part {w}." for w in range(self.windows)), options.language or "en", 3.0)
        finally:
            if not finished:
                self.closed_early = True


def generation_model(model_id: str = "tiny", engine: FakeEngine | None = None) -> ServedGenerationModel:
    return ServedGenerationModel(description(model_id), FakeLoaded(), engine or FakeEngine())


def speech_model(model_id: str = "whisper", model: FakeSpeechModel | None = None) -> ServedSpeechModel:
    return ServedSpeechModel(description(model_id, speech=True), model or FakeSpeechModel())


class FakeGenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Just enough of Generate to drive the runtime: engine outputs become chunks, errors are mapped."""

    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics | None = None) -> None:
        self._registry = registry
        self._metrics = metrics

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerationChunk]:
        request_id = request.options.request_id
        async with rpc_errors(context, request_id):
            served = await self._registry.generation_model(request.model)
            engine_request = EngineRequest(request_id, tuple(request.token_ids.ids) or (1, 2, 3))
            started = time.monotonic()
            async for output in served.engine.generate(engine_request):
                if self._metrics is not None and output.finished and output.usage is not None:
                    self._metrics.first_token(served.description.id, time.monotonic() - started)
                    self._metrics.tokens(
                        served.description.id, output.usage.prompt_tokens, output.usage.completion_tokens
                    )
                choices = [generation_pb2.ChoiceDelta(index=d.index, text=d.text) for d in output.deltas]
                yield generation_pb2.GenerationChunk(
                    request_id=request_id, model=served.description.id, choices=choices
                )


@asynccontextmanager
async def running_server(
    models: Sequence[ServedModel] = (),
    *,
    registry: ModelRegistry | None = None,
    **config_changes: Any,
) -> AsyncIterator[RunningServer]:
    """A real server on a free 127.0.0.1 port with the given fake models; stopped at the end."""
    config = replace(ServerConfig(port=0, drain_grace_seconds=5.0), **config_changes)
    registry = registry or ModelRegistry(models)
    metrics = ServerMetrics()
    running = await start_server(
        config, registry, metrics=metrics, generation_servicer=FakeGenerationServicer(registry, metrics)
    )
    try:
        yield running
    finally:
        await running.abort()


def target(running: RunningServer) -> str:
    return f"127.0.0.1:{running.ports[0]}"
