"""A scripted fake protoserve server (grpc.aio, real sockets) for the client's tests.

The fake runs in a thread of its own with its own event loop, so blocking-client tests and asyncio
tests talk to it the same way. The last user message scripts the reply:
- "fail:CODE message": abort with that status (RESOURCE_EXHAUSTED also sends `retry-after: 2.5`);
- "slow": sleep 5 s before answering (deadline tests);
- "fail-midstream": one chunk, then INTERNAL;
- "drip": one chunk, then 5 s before each next one (cancellation tests);
- anything else: the answer "echo: TEXT", streamed in three pieces.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from protoserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    transcription_pb2,
    transcription_pb2_grpc,
)


@dataclass
class Recorded:
    """What the fake saw: each request (by method name) and each call's metadata."""

    requests: list[tuple[str, Any]] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def last(self, method: str) -> Any:
        return [request for name, request in self.requests if name == method][-1]


def _user_text(request: generation_pb2.ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return "".join(part.text for part in message.content if part.HasField("text"))
    return ""


async def _apply_script(text: str, context: grpc.aio.ServicerContext) -> None:
    if text == "slow":
        await asyncio.sleep(5)
    if text.startswith("fail:"):
        code_name, _, message = text[len("fail:") :].partition(" ")
        code = grpc.StatusCode[code_name]
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            context.set_trailing_metadata((("retry-after", "2.5"),))
        await context.abort(code, message or code_name)


def _pieces(answer: str) -> list[str]:
    third = max(1, len(answer) // 3)
    return [answer[:third], answer[third : 2 * third], answer[2 * third :]]


class FakeGeneration(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, recorded: Recorded) -> None:
        self.recorded = recorded

    def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.recorded.requests.append((method, request))
        self.recorded.metadata.append({item.key: item.value for item in context.invocation_metadata() or ()})

    async def _stream(
        self, answer: str, request: Any, context: grpc.aio.ServicerContext, fail_midstream: bool
    ) -> AsyncIterator[generation_pb2.GenerationChunk]:
        request_id = request.options.request_id or "fake-1"
        for position, piece in enumerate(_pieces(answer)):
            last = position == 2
            choice = generation_pb2.ChoiceDelta(index=0, text=piece, token_ids=[position])
            if last:
                choice.finish_reason = common_pb2.FINISH_REASON_STOP
            yield generation_pb2.GenerationChunk(request_id=request_id, model="fake-model", created=7, choices=[choice])
            if fail_midstream:
                await context.abort(grpc.StatusCode.INTERNAL, "engine failed")
            if isinstance(request, generation_pb2.ChatRequest) and _user_text(request) == "drip":
                await asyncio.sleep(5)
        usage = common_pb2.Usage(prompt_tokens=4, completion_tokens=3, total_tokens=7)
        yield generation_pb2.GenerationChunk(request_id=request_id, model="fake-model", created=7, usage=usage)

    def _result(self, answer: str, request: Any) -> generation_pb2.GenerationResult:
        choices = [
            generation_pb2.Choice(
                index=index,
                text=answer if index == 0 else f"{answer} #{index}",
                token_ids=[1, 2, 3],
                finish_reason=common_pb2.FINISH_REASON_STOP,
            )
            for index in range(max(1, request.sampling.n))
        ]
        return generation_pb2.GenerationResult(
            request_id=request.options.request_id or "fake-1",
            model=request.model or "fake-model",
            created=7,
            choices=choices,
            usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=3, total_tokens=7),
        )

    async def Chat(self, request: generation_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> Any:
        self._record("Chat", request, context)
        text = _user_text(request)
        await _apply_script(text, context)
        try:
            async for chunk in self._stream(f"echo: {text}", request, context, text == "fail-midstream"):
                yield chunk
        except asyncio.CancelledError:
            self.recorded.cancelled.append("Chat")
            raise

    async def ChatUnary(self, request: generation_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> Any:
        self._record("ChatUnary", request, context)
        text = _user_text(request)
        await _apply_script(text, context)
        return self._result(f"echo: {text}", request)

    @staticmethod
    def _prompt(request: generation_pb2.GenerateRequest) -> str:
        if request.HasField("token_ids"):
            return " ".join(str(token) for token in request.token_ids.ids)
        return request.text

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        self._record("Generate", request, context)
        await _apply_script(self._prompt(request), context)
        async for chunk in self._stream(f"more {self._prompt(request)}", request, context, False):
            yield chunk

    async def GenerateUnary(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        self._record("GenerateUnary", request, context)
        await _apply_script(self._prompt(request), context)
        return self._result(f"more {self._prompt(request)}", request)

    async def Tokenize(self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext) -> Any:
        self._record("Tokenize", request, context)
        if request.HasField("messages"):
            words = [f"<{message.role}>" for message in request.messages.messages]
        else:
            words = request.text.split()
        return generation_pb2.TokenizeResponse(
            token_ids=[len(word) for word in words], tokens=words, context_length=2048
        )


class FakeModels(models_pb2_grpc.ModelServiceServicer):
    MODELS = [
        models_pb2.ModelInfo(
            id="fake-model",
            modalities=[models_pb2.MODALITY_TEXT, models_pb2.MODALITY_IMAGE],
            context_length=2048,
            loaded=True,
            architecture="LlamaForCausalLM",
            capabilities=["generate", "chat"],
        ),
        models_pb2.ModelInfo(id="fake-whisper", modalities=[models_pb2.MODALITY_AUDIO], capabilities=["transcribe"]),
    ]

    async def ListModels(self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        return models_pb2.ListModelsResponse(models=self.MODELS)

    async def GetModel(self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> Any:
        for model in self.MODELS:
            if model.id == request.id:
                return model
        await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.id!r} is not served")


class FakeTranscription(transcription_pb2_grpc.TranscriptionServiceServicer):
    def __init__(self, recorded: Recorded) -> None:
        self.recorded = recorded

    async def Transcribe(self, request: transcription_pb2.TranscribeRequest, context: grpc.aio.ServicerContext) -> Any:
        self.recorded.requests.append(("Transcribe", request))
        if request.audio == b"not audio":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audio could not be decoded")
        first = transcription_pb2.Segment(id=0, start=0.0, end=1.5, text="Hello", token_ids=[1])
        second = transcription_pb2.Segment(id=1, start=1.5, end=3.0, text=" world.", token_ids=[2])
        yield transcription_pb2.TranscriptionChunk(request_id="t-1", segments=[first], text_delta="Hello", model="w")
        yield transcription_pb2.TranscriptionChunk(request_id="t-1", segments=[second], text_delta=" world.", model="w")
        yield transcription_pb2.TranscriptionChunk(
            request_id="t-1", done=True, text="Hello world.", language=request.language or "en", duration=3.0, model="w"
        )


class FakeServer:
    """The fake server on its own thread and event loop, listening on `address` (TCP port 0 or a unix path)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.target = ""
        self.recorded = Recorded()
        self.health = health.aio.HealthServicer()
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _start(self) -> None:
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(FakeGeneration(self.recorded), server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(FakeModels(), server)
        transcription_pb2_grpc.add_TranscriptionServiceServicer_to_server(FakeTranscription(self.recorded), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(self.address)
        self.target = self.address if self.address.startswith("unix:") else f"127.0.0.1:{port}"
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server = server

    def run(self, coroutine: Any) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.run(self.health.set("", status))

    def start(self) -> FakeServer:
        self._thread.start()
        self.run(self._start())
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.run(self._server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
