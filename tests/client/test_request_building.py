"""Building requests from plain values: what is accepted, and a clear InvalidArgument for everything else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from protoserve.client.chat_messages import to_chat_messages, to_tool_choice, to_tools
from protoserve.client.errors import InvalidArgument, Overloaded, ProtoserveError, error_from_status, parse_retry_after
from protoserve.client.request_building import (
    RequestTags,
    build_generate_request,
    build_tokenize_request,
    build_transcribe_request,
)
from protoserve.client.sampling import to_response_format, to_sampling_params
from protoserve.v1 import generation_pb2


def test_text_content_and_bare_parts() -> None:
    [message] = to_chat_messages(
        [{"role": "user", "content": ["look", b"\x89PNG", {"type": "image", "image": "https://x/y.png"}]}]
    )
    assert message.content[0].text == "look"
    assert message.content[1].image.data == b"\x89PNG"
    assert message.content[2].image.url == "https://x/y.png"


def test_openai_sdk_dumps_with_none_fields_are_accepted() -> None:
    dumped = {"role": "assistant", "content": "hi", "refusal": None, "audio": None, "reasoning_content": "hmm"}
    [message] = to_chat_messages([dumped])
    assert message.reasoning_content == "hmm"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list"),
        ({"role": "user"}, "must be a list"),
        ([], "must not be empty"),
        ([42], "message 0 must be a dict"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user", "content": 5}], "content must be a string or a list"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unknown type 'audio'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
        ([{"role": "user", "content": [{"type": "image"}]}], "without data or url"),
        ([{"role": "user", "content": [{"type": "image", "data": "not bytes"}]}], "image url must be|must be bytes"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}], "image_url must be"),
        ([{"role": "user", "content": "x", "colour": "red"}], "unknown keys \\['colour'\\]"),
        ([{"role": "assistant", "tool_calls": [{"id": "1"}]}], "tool call 0 must be a dict"),
        ([{"role": "assistant", "tool_calls": "call"}], "tool_calls must be a list"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {1j}}}]}], "arguments"),
    ],
)
def test_bad_messages(messages: Any, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        to_chat_messages(messages)


def test_tools_and_tool_choice() -> None:
    [tool] = to_tools([{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"a": [1]}}}])
    assert tool.function.name == "f" and list(tool.function.parameters["a"]) == [1]
    assert to_tool_choice("required").mode == generation_pb2.ToolChoice.MODE_REQUIRED
    assert to_tool_choice(None) is None
    with pytest.raises(InvalidArgument, match="only 'function'"):
        to_tools([{"type": "retrieval", "function": {"name": "f"}}])
    with pytest.raises(InvalidArgument, match="tool 0 must be a dict"):
        to_tools([{"name": "f"}])
    with pytest.raises(InvalidArgument, match="parameters must be a JSON object"):
        to_tools([{"function": {"name": "f", "parameters": "[]"}}])
    with pytest.raises(InvalidArgument, match="not one of"):
        to_tool_choice("always")
    with pytest.raises(InvalidArgument, match="tool_choice must be"):
        to_tool_choice({"name": "f"})


def test_sampling_options() -> None:
    params = to_sampling_params({"temperature": 0, "top_k": 5, "stop": ["a", "b"], "seed": 2**63, "logprobs": True})
    assert params.temperature == 0 and params.top_k == 5 and list(params.stop) == ["a", "b"]
    assert params.seed == 2**63 and params.logprobs
    assert not to_sampling_params({"temperature": None}).HasField("temperature")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"temprature": 1}, "did you mean 'temperature'"),
        ({"colour": 1}, "known:"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"temperature": True}, "temperature must be a number"),
        ({"max_tokens": -1}, "max_tokens must be an integer from 0"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"n": 2**32}, "n must be an integer"),
        ({"logprobs": 1}, "logprobs must be True or False"),
        ({"stop": [1]}, "stop must be a string or a list of strings"),
        ({"stop_token_ids": "12"}, "stop_token_ids must be a list"),
        ({"stop_token_ids": [-3]}, "token ids"),
        ({"logit_bias": [1]}, "logit_bias must be a dict"),
        ({"logit_bias": {"x": 1}}, "logit_bias keys"),
        ({"logit_bias": {1: "high"}}, "must be a number"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "not both"),
    ],
)
def test_bad_sampling_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        to_sampling_params(options)


def test_response_formats() -> None:
    assert to_response_format("json_object") is not None
    with pytest.raises(InvalidArgument, match="response_format must be"):
        to_response_format({"type": "yaml"})
    with pytest.raises(InvalidArgument, match="needs"):
        to_response_format({"type": "json_schema", "json_schema": {"name": "x"}})


def test_prompts_tags_and_audio(tmp_path: Path) -> None:
    tags = RequestTags()
    with pytest.raises(InvalidArgument, match="prompt must be text or a list of token ids"):
        build_generate_request(b"bytes", model="", response_format=None, tags=tags, sampling={})
    with pytest.raises(InvalidArgument, match="non-negative integers"):
        build_generate_request([1, "2"], model="", response_format=None, tags=tags, sampling={})
    with pytest.raises(InvalidArgument, match="model must be a string"):
        build_generate_request("x", model=None, response_format=None, tags=tags, sampling={})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="priority must be an integer"):
        RequestTags(priority="high").to_proto()  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="must be a list"):
        build_tokenize_request(42, model="")
    audio_options: dict[str, Any] = {
        "model": "",
        "language": "",
        "prompt": "",
        "temperature": 0.0,
        "task": "transcribe",
        "filename": "",
        "tags": tags,
    }
    with pytest.raises(InvalidArgument, match="cannot read audio file"):
        build_transcribe_request(tmp_path / "missing.wav", **audio_options)
    with pytest.raises(InvalidArgument, match="audio is empty"):
        build_transcribe_request(b"", **audio_options)
    with pytest.raises(InvalidArgument, match="task must be"):
        build_transcribe_request(b"x", **{**audio_options, "task": "summarise"})


def test_error_mapping_helpers() -> None:
    assert parse_retry_after([("retry-after", "3")]) == 3.0
    assert parse_retry_after([("Retry-After", b"0.5")]) == 0.5
    assert parse_retry_after([("retry-after", "soon")]) is None
    assert parse_retry_after([("retry-after", "-1")]) is None
    assert parse_retry_after(None) is None
    overloaded = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", [("retry-after", "1")])
    assert isinstance(overloaded, Overloaded) and overloaded.retry_after == 1.0
    other = error_from_status(grpc.StatusCode.ABORTED, "raced")
    assert type(other) is ProtoserveError and other.code is grpc.StatusCode.ABORTED
    assert isinstance(error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "x"), ValueError)


def test_importing_the_client_pulls_neither_torch_nor_aiohttp() -> None:
    code = (
        "import sys, protoserve.client, protoserve.client.cli.main;"
        "print(sorted(name for name in ('torch', 'transformers', 'aiohttp', 'numpy') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
