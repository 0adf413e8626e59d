"""`ProtoserveClient`: the blocking client. Every failure raises a `ProtoserveError` subclass.

    with ProtoserveClient("127.0.0.1:50051", api_key="...") as client:
        print(client.chat([{"role": "user", "content": "hi"}], max_tokens=32).text)
        for delta in client.chat([{"role": "user", "content": "hi"}], stream=True):
            print(delta.text, end="")

Streams are generators: leaving the loop early (break, an exception) cancels the call on the server.
Argument errors raise `InvalidArgument` when the method is called, before anything is sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve.client import from_proto
from protoserve.client.call_settings import HEALTH_TIMEOUT_SECONDS, CallSettings
from protoserve.client.channel import TLSOptions, create_channel
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


def _map_stream(chunks: Iterator[Any], convert: Callable[[Any], Iterator[Item]]) -> Iterator[Item]:
    """Convert each message of a stream; closing the result closes (and so cancels) the stream."""
    with contextlib.closing(chunks):  # type: ignore[type-var]
        for chunk in chunks:
            yield from convert(chunk)


class ProtoserveClient:
    """A blocking client of one protoserve server (or a `dns:///` set of replicas).

    `target`: `HOST:PORT`, `unix:/path.sock`, `dns:///name:port`. `api_key` is sent as
    `authorization: Bearer KEY`. `timeout` is the default deadline of every call in seconds (None:
    no deadline); each method's own `timeout` overrides it. `priority` is the default scheduling priority.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: TLSOptions | None = None,
        timeout: float | None = None,
        priority: int = 0,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._settings = CallSettings(api_key=api_key, timeout=timeout, priority=priority)
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else create_channel(target, tls=tls)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._transcription = transcription_pb2_grpc.TranscriptionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        """Close the channel (unless it was handed in)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> ProtoserveClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # --- calls -------------------------------------------------------------------------------

    def _unary(self, method: Callable[..., Response], request: Any, timeout: float | None) -> Response:
        try:
            return method(request, timeout=self._settings.timeout_for(timeout), metadata=self._settings.metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def _stream(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Iterator[Any]:
        """Start a server-streaming call now (so argument errors raise here) and iterate it lazily."""
        call = method(request, timeout=self._settings.timeout_for(timeout), metadata=self._settings.metadata)
        return self._iterate(call)

    @staticmethod
    def _iterate(call: Any) -> Iterator[Any]:
        try:
            yield from call
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            call.cancel()  # no-op when the stream ended; frees the server's work when the caller stopped early

    def _deltas(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Iterator[Delta]:
        return _map_stream(self._stream(method, request, timeout), from_proto.deltas)

    # --- generation --------------------------------------------------------------------------

    @overload
    def chat(self, messages: Sequence[Any], *, stream: Literal[False] = ..., **options: Any) -> Reply: ...
    @overload
    def chat(self, messages: Sequence[Any], *, stream: Literal[True], **options: Any) -> Iterator[Delta]: ...

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
    ) -> Reply | Iterator[Delta]:
        """Answer a conversation. `sampling` takes SamplingParams' fields (temperature, max_tokens, n, ...)."""
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
            return self._deltas(self._generation.Chat, request, timeout)
        return from_proto.reply(self._unary(self._generation.ChatUnary, request, timeout))

    @overload
    def generate(self, prompt: str | Sequence[int], *, stream: Literal[False] = ..., **options: Any) -> Reply: ...
    @overload
    def generate(self, prompt: str | Sequence[int], *, stream: Literal[True], **options: Any) -> Iterator[Delta]: ...

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
    ) -> Reply | Iterator[Delta]:
        """Complete a raw prompt: text (the tokenizer adds special tokens) or token ids (used as they are)."""
        request = build_generate_request(
            prompt,
            model=model,
            response_format=response_format,
            tags=self._settings.tags(request_id, priority, user),
            sampling=sampling,
        )
        if stream:
            return self._deltas(self._generation.Generate, request, timeout)
        return from_proto.reply(self._unary(self._generation.GenerateUnary, request, timeout))

    def tokenize(
        self, text_or_messages: str | Sequence[Any], *, model: str = "", timeout: float | None = None
    ) -> Tokens:
        """Tokens of raw text (as `generate` sees it) or of a conversation (as `chat` sees it)."""
        request = build_tokenize_request(text_or_messages, model=model)
        return from_proto.tokens(self._unary(self._generation.Tokenize, request, timeout))

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
    ) -> Transcript: ...
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
    ) -> Iterator[TranscriptDelta]: ...

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
    ) -> Transcript | Iterator[TranscriptDelta]:
        """Transcribe (or, with task="translate", translate to English) encoded audio: bytes or a Path."""
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
        chunks = self._stream(self._transcription.Transcribe, request, timeout)
        deltas = _map_stream(chunks, lambda chunk: iter((from_proto.transcript_delta(chunk),)))
        if stream:
            return deltas
        builder = from_proto.TranscriptBuilder()
        for delta in deltas:
            builder.add(delta)
        return builder.build()

    # --- models and health -------------------------------------------------------------------

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server can answer with, served ones first."""
        response = self._unary(self._models.ListModels, models_pb2.ListModelsRequest(), timeout)
        return [from_proto.model_info(model) for model in response.models]

    def model(self, model_id: str, *, timeout: float | None = None) -> ModelInfo:
        """One model; raises `NotFound` when the server does not know it."""
        response = self._unary(self._models.GetModel, models_pb2.GetModelRequest(id=model_id), timeout)
        return from_proto.model_info(response)

    def load_model(self, model_id: str, *, timeout: float | None = None) -> ModelInfo:
        """Load a local folder or hub-cache model; `PermissionDenied` unless the server allows on-demand loading."""
        return from_proto.model_info(
            self._unary(self._models.LoadModel, models_pb2.LoadModelRequest(id=model_id), timeout)
        )

    def unload_model(self, model_id: str, *, timeout: float | None = None) -> bool:
        """Unload an on-demand model; False when it was not loaded."""
        response = self._unary(self._models.UnloadModel, models_pb2.UnloadModelRequest(id=model_id), timeout)
        return response.unloaded

    def health(self, service: str = "", *, timeout: float = HEALTH_TIMEOUT_SECONDS) -> bool:
        """True when the server (or one named service) reports SERVING.

        False when it reports anything else, does not know the service, or cannot be reached in
        `timeout` seconds; other failures (e.g. a TLS or authentication error) raise.
        """
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._health.Check(request, timeout=timeout, metadata=self._settings.metadata)
        except grpc.RpcError as error:
            if error.code() in _UNREACHABLE:
                return False
            raise error_from_rpc(error) from None
        return response.status == health_pb2.HealthCheckResponse.SERVING
