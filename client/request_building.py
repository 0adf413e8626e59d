"""Whole protobuf requests from the client's arguments. Shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protoserve.client.chat_messages import to_chat_messages, to_struct, to_tool_choice, to_tools
from protoserve.client.errors import InvalidArgument
from protoserve.client.sampling import to_sampling_params
from protoserve.v1 import common_pb2, generation_pb2, transcription_pb2

_TASKS = {
    "transcribe": transcription_pb2.TranscribeRequest.TASK_TRANSCRIBE,
    "translate": transcription_pb2.TranscribeRequest.TASK_TRANSLATE,
}


@dataclass(frozen=True)
class RequestTags:
    """Per-request options that are not about sampling: id (echoed back, logged), priority, user."""

    request_id: str = ""
    priority: int = 0
    user: str = ""

    def to_proto(self) -> common_pb2.RequestOptions:
        if not isinstance(self.request_id, str) or not isinstance(self.user, str):
            raise InvalidArgument("request_id and user must be strings")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise InvalidArgument(f"priority must be an integer, got {self.priority!r}")
        if not -(2**31) <= self.priority < 2**31:
            raise InvalidArgument(f"priority {self.priority} is out of range")
        return common_pb2.RequestOptions(request_id=self.request_id, priority=self.priority, user=self.user)


def _model(model: Any) -> str:
    if not isinstance(model, str):
        raise InvalidArgument(f"model must be a string (empty for the server's default), got {model!r}")
    return model


def build_chat_request(
    messages: Any,
    *,
    model: str,
    tools: Any,
    tool_choice: Any,
    response_format: Any,
    parallel_tool_calls: bool | None,
    chat_template_kwargs: Mapping[str, Any] | None,
    tags: RequestTags,
    sampling: Mapping[str, Any],
) -> generation_pb2.ChatRequest:
    request = generation_pb2.ChatRequest(
        model=_model(model),
        messages=to_chat_messages(messages),
        tools=to_tools(tools),
        sampling=to_sampling_params(sampling, response_format),
        options=tags.to_proto(),
    )
    choice = to_tool_choice(tool_choice)
    if choice is not None:
        request.tool_choice.CopyFrom(choice)
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = bool(parallel_tool_calls)
    if chat_template_kwargs is not None:
        request.chat_template_kwargs.CopyFrom(to_struct(chat_template_kwargs, "chat_template_kwargs"))
    return request


def _token_ids(prompt: Sequence[Any]) -> generation_pb2.TokenIds:
    for token in prompt:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < 2**32:
            raise InvalidArgument(f"a token-id prompt must hold non-negative integers, found {token!r}")
    return generation_pb2.TokenIds(ids=list(prompt))


def build_generate_request(
    prompt: str | Sequence[int],
    *,
    model: str,
    response_format: Any,
    tags: RequestTags,
    sampling: Mapping[str, Any],
) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(
        model=_model(model), sampling=to_sampling_params(sampling, response_format), options=tags.to_proto()
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray):
        request.token_ids.CopyFrom(_token_ids(prompt))
    else:
        raise InvalidArgument(f"prompt must be text or a list of token ids, got {type(prompt).__name__}")
    return request


def build_tokenize_request(text_or_messages: Any, *, model: str) -> generation_pb2.TokenizeRequest:
    """Text is tokenized as Generate would; a list of messages as Chat would (with the template)."""
    if isinstance(text_or_messages, str):
        return generation_pb2.TokenizeRequest(model=_model(model), text=text_or_messages)
    messages = generation_pb2.ChatMessages(messages=to_chat_messages(text_or_messages))
    return generation_pb2.TokenizeRequest(model=_model(model), messages=messages)


def read_audio(audio: Any) -> tuple[bytes, str]:
    """The audio's bytes and, for a path, its file name (a hint for the server's decoder)."""
    if isinstance(audio, bytes | bytearray | memoryview):
        return bytes(audio), ""
    if isinstance(audio, Path):
        try:
            return audio.read_bytes(), audio.name
        except OSError as error:
            raise InvalidArgument(f"cannot read audio file {audio}: {error.strerror}") from None
    raise InvalidArgument(f"audio must be bytes or a pathlib.Path, got {type(audio).__name__}")


def build_transcribe_request(
    audio: Any,
    *,
    model: str,
    language: str,
    prompt: str,
    temperature: float,
    task: str,
    filename: str,
    tags: RequestTags,
) -> transcription_pb2.TranscribeRequest:
    data, file_name = read_audio(audio)
    if not data:
        raise InvalidArgument("audio is empty")
    if task not in _TASKS:
        raise InvalidArgument(f"task must be 'transcribe' or 'translate', got {task!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise InvalidArgument(f"temperature must be a number, got {temperature!r}")
    for name, value in (("language", language), ("prompt", prompt), ("filename", filename)):
        if not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string, got {value!r}")
    return transcription_pb2.TranscribeRequest(
        model=_model(model),
        audio=data,
        filename=filename or file_name,
        language=language,
        prompt=prompt,
        temperature=float(temperature),
        task=_TASKS[task],
        options=tags.to_proto(),
    )
