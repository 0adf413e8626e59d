"""`AsyncProtoserveClient`: the asyncio client, the same calls as `ProtoserveClient`.

    async with AsyncProtoserveClient("127.0.0.1:50051") as client:
        reply = await client.chat([{"role": "user", "content": "hi"}], max_tokens=32)
        async for delta in client.chat([{"role": "user", "content": "hi"}], stream=True):
            print(delta.text, end="")

Create it inside the event loop that uses it. Unary methods are coroutines; with `stream=True` a
method returns an `AsyncStream` at once. Argument errors raise `InvalidArgument` when the method
is called, before anything is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve.client import from_proto
from protoserve.client.async_stream import AsyncStream, call_cancelled_elsewhere, this_task_is_being_cancelled
from protoserve.client.call_settings import HEALTH_TIMEOUT_SECONDS, CallSettings
from protoserve.client.channel import TLSOptions, create_async_channel
from protoserve.client.errors import error_from_rpc
from protoserve.client.request_building import (
    build_chat_request,
    build_generate_request,
    build_tokenize_request,
    build_transcribe_request,
)
from protoserve.client.results import Delta, ModelInfo, Reply, Tokens, Transcript, TranscriptDelta
from protoserve.v1 import generation_pb2_grpc, models_pb2, models_pb2_grpc, transcription_pb2_grpc

Response = TypeVar("Response")
Item = TypeVar("Item")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND)


class AsyncProtoserveClient:
    """An asyncio client of one protoserve server; options as `ProtoserveClient`'s."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: TLSOptions | None = None,
        timeout: float | None = None,
        priority: int = 0,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._settings = CallSettings(api_key=api_key, timeout=timeout, priority=priority)
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else create_async_channel(target, tls=tls)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._transcription = transcription_pb2_grpc.TranscriptionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        """Close the channel (unless it was handed in); calls still running are cancelled."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncProtoserveClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    # --- calls -------------------------------------------------------------------------------

    async def _unary(
        self, method: Callable[..., Awaitable[Response]], request: Any, deadline: float | None
    ) -> Response:
        try:
            return await method(request, timeout=deadline, metadata=self._settings.metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        except asyncio.CancelledError:
            if this_task_is_being_cancelled():
                raise
            raise call_cancelled_elsewhere() from None

    def _stream(
        self, method: Callable[..., Any], request: Any, deadline: float | None, convert: Callable[[Any], Iterable[Item]]
    ) -> AsyncStream[Item]:
        return AsyncStream(method(request, timeout=deadline, metadata=self._settings.metadata), convert)

    async def _reply(self, method: Callable[..., Any], request: Any, deadline: float | None) -> Reply:
        return from_proto.reply(await self._unary(method, request, deadline))

    # --- generation --------------------------------------------------------------------------

    @overload
    def chat(self, messages: Sequence[Any], *, stream: Literal[False] = ..., **options: Any) -> Awaitable[Reply]: ...
    @overload
    def chat(self, messages: Sequence[Any], *, stream: Literal[True], **options: Any) -> AsyncStream[Delta]: ...

    def chat(
        self,
        messages: Sequence[Any],
        *,
        model: str = "",
        stream: bool = False,
        tools: Sequence[Any] | None = None,
        tool_choice: Any = None,
        response_format: Any = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        request_id: str = "",
        priority: int | None = None,
        user: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> Awaitable[Reply] | AsyncStream[Delta]:
        """Answer a conversation. `sampling` takes SamplingParams' fields (temperature, max_tokens, n, ...)."""
        deadline = self._settings.timeout_for(timeout)
        request = build_chat_request(
            messages,
            model=model,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
            parallel_tool_calls=parallel_tool_calls,
            chat_template_kwargs=chat_template_kwargs,
            tags=self._settings.tags(request_id, priority, user),
            sampling=sampling,
        )
        if stream:
            return self._stream(self._generation.Chat, request, deadline, from_proto.deltas)
        return self._reply(self._generation.ChatUnary, request, deadline)

    @overload
    def generate(
        self, prompt: str | Sequence[int], *, stream: Literal[False] = ..., **options: Any
    ) -> Awaitable[Reply]: ...
    @overload
    def generate(self, prompt: str | Sequence[int], *, stream: Literal[True], **options: Any) -> AsyncStream[Delta]: ...

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        model: str = "",
        stream: bool = False,
        response_format: Any = None,
        request_id: str = "",
        priority: int | None = None,
        user: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> Awaitable[Reply] | AsyncStream[Delta]:
        """Complete a raw prompt: text (the tokenizer adds special tokens) or token ids (used as they are)."""
        deadline = self._settings.timeout_for(timeout)
        request = build_generate_request(
            prompt,
            model=model,
            response_format=response_format,
            tags=self._settings.tags(request_id, priority, user),
            sampling=sampling,
        )
        if stream:
            return self._stream(self._generation.Generate, request, deadline, from_proto.deltas)
        return self._reply(self._generation.GenerateUnary, request, deadline)

    async def tokenize(
        self, text_or_messages: str | Sequence[Any], *, model: str = "", timeout: float | None = None
    ) -> Tokens:
        """Tokens of raw text (as `generate` sees it) or of a conversation (as `chat` sees it)."""
        request = build_tokenize_request(text_or_messages, model=model)
        deadline = self._settings.timeout_for(timeout)
        return from_proto.tokens(await self._unary(self._generation.Tokenize, request, deadline))

    # --- transcription -----------------------------------------------------------------------

    @overload
    def transcribe(
        self,
        audio: Any,
        *,
        model: str = ...,
        stream: Literal[False] = ...,
        language: str = ...,
        prompt: str = ...,
        temperature: float = ...,
        task: str = ...,
        filename: str = ...,
        request_id: str = ...,
        priority: int | None = ...,
        user: str = ...,
        timeout: float | None = ...,
    ) -> Awaitable[Transcript]: ...
    @overload
    def transcribe(
        self,
        audio: Any,
        *,
        model: str = ...,
        stream: Literal[True],
        language: str = ...,
        prompt: str = ...,
        temperature: float = ...,
        task: str = ...,
        filename: str = ...,
        request_id: str = ...,
        priority: int | None = ...,
        user: str = ...,
        timeout: float | None = ...,
    ) -> AsyncStream[TranscriptDelta]: ...

    def transcribe(
        self,
        audio: Any,
        *,
        model: str = "",
        stream: bool = False,
        language: str = "",
        prompt: str = "",
        temperature: float = 0.0,
        task: str = "transcribe",
        filename: str = "",
        request_id: str = "",
        priority: int | None = None,
        user: str = "",
        timeout: float | None = None,
    ) -> Awaitable[Transcript] | AsyncStream[TranscriptDelta]:
        """Transcribe (or, with task="translate", translate to English) encoded audio: bytes or a Path."""
        deadline = self._settings.timeout_for(timeout)
        request = build_transcribe_request(
            audio,
            model=model,
            language=language,
            prompt=prompt,
            temperature=temperature,
            task=task,
            filename=filename,
            tags=self._settings.tags(request_id, priority, user),
        )
        deltas = self._stream(
            self._transcription.Transcribe, request, deadline, lambda chunk: (from_proto.transcript_delta(chunk),)
        )
        return deltas if stream else self._gather_transcript(deltas)

    @staticmethod
    async def _gather_transcript(deltas: AsyncStream[TranscriptDelta]) -> Transcript:
        builder = from_proto.TranscriptBuilder()
        async with deltas:
            async for delta in deltas:
                builder.add(delta)
        return builder.build()

    # --- models and health -------------------------------------------------------------------

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server can answer with, served ones first."""
        deadline = self._settings.timeout_for(timeout)
        response = await self._unary(self._models.ListModels, models_pb2.ListModelsRequest(), deadline)
        return [from_proto.model_info(model) for model in response.models]

    async def model(self, model_id: str, *, timeout: float | None = None) -> ModelInfo:
        """One model; raises `NotFound` when the server does not know it."""
        deadline = self._settings.timeout_for(timeout)
        response = await self._unary(self._models.GetModel, models_pb2.GetModelRequest(id=model_id), deadline)
        return from_proto.model_info(response)

    async def load_model(self, model_id: str, *, timeout: float | None = None) -> ModelInfo:
        """Load a local folder or hub-cache model; `PermissionDenied` unless the server allows on-demand loading."""
        deadline = self._settings.timeout_for(timeout)
        response = await self._unary(self._models.LoadModel, models_pb2.LoadModelRequest(id=model_id), deadline)
        return from_proto.model_info(response)

    async def unload_model(self, model_id: str, *, timeout: float | None = None) -> bool:
        """Unload an on-demand model; False when it was not loaded."""
        deadline = self._settings.timeout_for(timeout)
        response = await self._unary(self._models.UnloadModel, models_pb2.UnloadModelRequest(id=model_id), deadline)
        return response.unloaded

    async def health(self, service: str = "", *, timeout: float = HEALTH_TIMEOUT_SECONDS) -> bool:
        """True when the server (or one named service) reports SERVING; see `ProtoserveClient.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._health.Check(request, timeout=timeout, metadata=self._settings.metadata)
        except grpc.RpcError as error:
            if error.code() in _UNREACHABLE:
                return False
            raise error_from_rpc(error) from None
        return response.status == health_pb2.HealthCheckResponse.SERVING
