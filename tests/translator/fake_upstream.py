"""A scriptable fake protoserve gRPC server for the translator's tests.

A real grpc.aio server on 127.0.0.1 implementing GenerationService, ModelService,
TranscriptionService and grpc.health.v1. Each test scripts it through attributes: the messages to
stream or return, an error to raise after N messages (with trailing metadata), a delay before each
message; it records every request with its metadata, and sets `cancelled` when a call is cancelled.
Like the real server it answers INVALID_ARGUMENT for out-of-range sampling values.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.server import RunningTranslator, start_translator
from protoserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    transcription_pb2,
    transcription_pb2_grpc,
)

MODEL_ID = "org/tiny-chat"
CREATED = 1_700_000_000


@dataclass
class ScriptedError:
    """Abort the call with `code` after sending `after_messages` messages."""

    code: grpc.StatusCode
    message: str
    after_messages: int = 0
    trailing_metadata: tuple[tuple[str, str], ...] = ()


def usage(prompt: int = 5, completion: int = 2, cached: int = 1, reasoning: int = 0) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )


def text_chunks(
    pieces: Sequence[str], choices: int = 1, finish: int = common_pb2.FINISH_REASON_STOP
) -> list[generation_pb2.GenerationChunk]:
    """One chunk per piece for each of `choices` choices; the last piece finishes; usage on the last chunk."""
    chunks = []
    for position, piece in enumerate(pieces):
        last = position == len(pieces) - 1
        deltas = [
            generation_pb2.ChoiceDelta(
                index=index,
                text=piece,
                token_ids=[position],
                finish_reason=finish if last else common_pb2.FINISH_REASON_UNSPECIFIED,
            )
            for index in range(choices)
        ]
        chunk = generation_pb2.GenerationChunk(request_id="r", model=MODEL_ID, created=CREATED, choices=deltas)
        if last:
            chunk.usage.CopyFrom(usage(completion=len(pieces) * choices))
        chunks.append(chunk)
    return chunks


def text_result(text: str = "Hello", choices: int = 1) -> generation_pb2.GenerationResult:
    return generation_pb2.GenerationResult(
        request_id="r",
        model=MODEL_ID,
        created=CREATED,
        usage=usage(),
        choices=[
            generation_pb2.Choice(index=index, text=text, token_ids=[1, 2], finish_reason=common_pb2.FINISH_REASON_STOP)
            for index in range(choices)
        ],
    )


def default_transcription() -> list[transcription_pb2.TranscriptionChunk]:
    first = transcription_pb2.Segment(id=0, start=0.0, end=1.5, text=" Hello there.", token_ids=[1, 2])
    second = transcription_pb2.Segment(id=1, start=1.5, end=3.25, text=" General Kenobi.", token_ids=[3])
    return [
        transcription_pb2.TranscriptionChunk(
            request_id="r", segments=[first], text_delta=" Hello there.", model="whisper"
        ),
        transcription_pb2.TranscriptionChunk(
            request_id="r", segments=[second], text_delta=" General Kenobi.", model="whisper"
        ),
        transcription_pb2.TranscriptionChunk(
            request_id="r",
            done=True,
            text=" Hello there. General Kenobi.",
            language="en",
            duration=3.25,
            model="whisper",
        ),
    ]


def sampling_problem(sampling: common_pb2.SamplingParams) -> str | None:
    """What the real server would refuse in these sampling parameters (a subset of its checks)."""
    if sampling.HasField("temperature") and not 0 <= sampling.temperature <= 2:
        return "temperature must be in [0, 2]"
    if sampling.HasField("top_p") and not 0 < sampling.top_p <= 1:
        return "top_p must be in (0, 1]"
    if sampling.HasField("min_p") and not 0 <= sampling.min_p <= 1:
        return "min_p must be in [0, 1]"
    for name in ("presence_penalty", "frequency_penalty"):
        if sampling.HasField(name) and not -2 <= getattr(sampling, name) <= 2:
            return f"{name} must be in [-2, 2]"
    if sampling.n > 8:
        return "n must be at most 8"
    if sampling.top_logprobs > 20:
        return "top_logprobs must be at most 20"
    if len(sampling.stop) > 16:
        return "at most 16 stop strings"
    return None


class FakeUpstream:
    """The scripted server. Set attributes before the request; read `requests` after."""

    def __init__(self) -> None:
        self.chunks: list[generation_pb2.GenerationChunk] = text_chunks(["Hel", "lo"])
        self.result: generation_pb2.GenerationResult = text_result()
        self.transcription: list[transcription_pb2.TranscriptionChunk] = default_transcription()
        self.models: list[models_pb2.ModelInfo] = [
            models_pb2.ModelInfo(
                id=MODEL_ID,
                owned_by="org",
                created=CREATED,
                context_length=2048,
                modalities=[models_pb2.MODALITY_TEXT],
                loaded=True,
                capabilities=["chat"],
            ),
        ]
        self.error: ScriptedError | None = None
        self.delay_seconds = 0.0
        self.requests: list[tuple[str, Any]] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server()
        self.target = ""

    def requests_of(self, method: str) -> list[Any]:
        """The requests received by one method (e.g. "Chat"), oldest first."""
        return [request for name, request in self.requests if name == method]

    async def start(self) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(_Generation(self), self.server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(_Models(self), self.server)
        transcription_pb2_grpc.add_TranscriptionServiceServicer_to_server(_Transcription(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.target = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.server.stop(grace=None)

    async def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.requests.append((method, request))
        self.metadata.append(
            {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        )
        self.started.set()
        sampling = getattr(request, "sampling", None)
        problem = sampling_problem(sampling) if sampling is not None else None
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.error is not None and self.error.after_messages == 0:
            await self._abort(context)

    async def _abort(self, context: grpc.aio.ServicerContext) -> None:
        assert self.error is not None
        await context.abort(self.error.code, self.error.message, trailing_metadata=self.error.trailing_metadata)

    async def stream(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, messages: Sequence[Any]
    ) -> AsyncIterator[Any]:
        try:
            await self._record(method, request, context)
            for sent, message in enumerate(messages):
                if self.error is not None and sent == self.error.after_messages and sent > 0:
                    await self._abort(context)
                if self.delay_seconds:
                    await asyncio.sleep(self.delay_seconds)
                yield message
            if self.error is not None and self.error.after_messages >= len(messages) > 0:
                await self._abort(context)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def unary(self, method: str, request: Any, context: grpc.aio.ServicerContext, reply: Any) -> Any:
        try:
            await self._record(method, request, context)
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            return reply
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


class _Generation(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802 (gRPC's names)
        async for message in self.fake.stream("Generate", request, context, self.fake.chunks):
            yield message

    async def Chat(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802 (gRPC's names)
        async for message in self.fake.stream("Chat", request, context, self.fake.chunks):
            yield message

    async def GenerateUnary(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.fake.unary("GenerateUnary", request, context, self.fake.result)

    async def ChatUnary(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.fake.unary("ChatUnary", request, context, self.fake.result)


class _Models(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    async def ListModels(self, request: Any, context: Any) -> Any:  # noqa: N802
        reply = models_pb2.ListModelsResponse(models=self.fake.models)
        return await self.fake.unary("ListModels", request, context, reply)

    async def GetModel(self, request: Any, context: Any) -> Any:  # noqa: N802
        found = [model for model in self.fake.models if model.id == request.id]
        if not found:
            self.fake.requests.append(("GetModel", request))
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.id!r} is not served here")
        return await self.fake.unary("GetModel", request, context, found[0])


class _Transcription(transcription_pb2_grpc.TranscriptionServiceServicer):
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    async def Transcribe(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802 (gRPC's names)
        async for message in self.fake.stream("Transcribe", request, context, self.fake.transcription):
            yield message


@asynccontextmanager
async def running_translator(upstream: FakeUpstream, **overrides: Any) -> AsyncIterator[RunningTranslator]:
    """A translator in front of `upstream`, with TranslatorConfig fields overridden as given."""
    config = replace(TranslatorConfig(upstream=upstream.target, upstream_api_key="upstream-secret"), **overrides)
    translator = await start_translator(config)
    try:
        yield translator
    finally:
        await translator.stop()
