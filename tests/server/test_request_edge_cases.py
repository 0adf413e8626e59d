"""Edge cases in chat and generation requests that must be refused (or served) cleanly, never INTERNAL:
non-finite numbers in Structs, a non-string `$schema`, deeply nested tool call arguments, and
conversations whose names, ids or rendered template exceed `max_prompt_chars`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from protoserve.server.chat.messages import MAX_ARGUMENTS_DEPTH, conversation_from_proto
from protoserve.server.chat.template import render_token_ids
from protoserve.server.convert import response_format_from_proto, struct_to_python
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.limits import RequestLimits
from protoserve.v1 import common_pb2
from protoserve.v1 import generation_pb2 as pb

try:
    from .generation_fakes import FakeEngine, server_config, start_server, stop_server, text_script, tiny_tokenizer
except ImportError:
    from generation_fakes import (  # type: ignore[no-redef]
        FakeEngine,
        server_config,
        start_server,
        stop_server,
        text_script,
        tiny_tokenizer,
    )

LIMITS = RequestLimits()


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    converted = struct_pb2.Struct()
    converted.update(value)
    return converted


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role="user", content=[pb.ContentPart(text=text)])


def called(name: str, arguments: str, call_id: str = "c1") -> list[pb.ChatMessage]:
    """A user turn, an assistant turn calling `name` and the tool's answer."""
    return [
        user("hi"),
        pb.ChatMessage(
            role="assistant",
            tool_calls=[pb.ToolCall(id=call_id, function=pb.FunctionCall(name=name, arguments=arguments))],
        ),
        pb.ChatMessage(role="tool", tool_call_id=call_id, content=[pb.ContentPart(text="ok")]),
    ]


def json_schema_format(schema: dict[str, Any]) -> common_pb2.ResponseFormat:
    return common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=struct(schema))


# ---- Structs holding NaN or Infinity ----


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"maximum": math.nan}, "at maximum"),
        ({"properties": {"n": {"minimum": -math.inf}}}, "at properties.n.minimum"),
        ({"enum": [1, {"x": math.inf}]}, "at enum[1].x"),
    ],
)
def test_non_finite_numbers_in_a_struct_are_refused_with_the_place(value: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidRequestError, match="numbers must be finite") as raised:
        struct_to_python(struct(value), "tools[0].function.parameters")
    assert str(raised.value).startswith("tools[0].function.parameters has ") and where in str(raised.value)


def test_a_non_finite_json_schema_names_the_field() -> None:
    with pytest.raises(InvalidRequestError, match=r"^sampling\.response_format\.json_schema has nan at maximum"):
        response_format_from_proto(json_schema_format({"type": "number", "maximum": math.nan}))


# ---- $schema that is not a string ----


@pytest.mark.parametrize("dialect", [5, ["x"], {"a": 1}, None, True])
def test_a_non_string_dollar_schema_is_refused(dialect: Any) -> None:
    with pytest.raises(InvalidRequestError, match=r"json_schema\.\$schema must be a string"):
        response_format_from_proto(json_schema_format({"$schema": dialect, "type": "object"}))


def test_a_string_dollar_schema_is_still_accepted() -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}
    spec = response_format_from_proto(json_schema_format(schema))
    assert spec is not None and spec.schema == schema


# ---- deeply nested tool call arguments ----


def arguments_of(messages: list[pb.ChatMessage]) -> Any:
    conversation = conversation_from_proto(messages, LIMITS, images_allowed=False)
    return conversation.messages[1]["tool_calls"][0]["function"]["arguments"]


def test_arguments_too_deep_for_json_loads_stay_raw_text() -> None:
    deep = "[" * 100_000
    assert arguments_of(called("f", deep)) == deep


def test_arguments_too_deep_to_render_stay_raw_text() -> None:
    """json.loads takes 500 levels, but rendering walks the object recursively and would overflow."""
    deep = '{"a":' * 500 + "1" + "}" * 500
    assert arguments_of(called("f", deep)) == deep
    at_limit = '{"a":' * MAX_ARGUMENTS_DEPTH + "1" + "}" * MAX_ARGUMENTS_DEPTH
    assert isinstance(arguments_of(called("f", at_limit)), dict)


# ---- max_prompt_chars ----


def test_names_and_ids_count_towards_the_prompt_size() -> None:
    small = RequestLimits(max_prompt_chars=100)
    for messages in (
        called("f" * 200, "{}"),
        called("f", "{}", call_id="c" * 200),
        [user("hi"), pb.ChatMessage(role="user", name="n" * 200, content=[pb.ContentPart(text="hi")])],
    ):
        with pytest.raises(InvalidRequestError, match="characters of text; at most 100 allowed"):
            conversation_from_proto(messages, small, images_allowed=False)


async def test_a_text_only_rendered_prompt_over_the_limit_is_refused() -> None:
    tokenizer = tiny_tokenizer()
    limits = dataclasses.replace(LIMITS, max_prompt_chars=40)
    with pytest.raises(InvalidRequestError, match=r"^the rendered conversation has 100 characters; at most 40"):
        await render_token_ids(
            tokenizer,
            "{% for i in range(50) %}xx{% endfor %}",
            [{"role": "user", "content": "hi"}],
            tools=None,
            template_kwargs={},
            limits=limits,
        )


# ---- through the service: INVALID_ARGUMENT, never INTERNAL ----


async def assert_invalid(request: pb.ChatRequest | pb.GenerateRequest, message: str, **server: Any) -> None:
    engine = FakeEngine(script=text_script([["ok"]]), context_length=1_000_000)
    running = await start_server(engine, **server)
    try:
        rpc = running.stub.ChatUnary if isinstance(request, pb.ChatRequest) else running.stub.GenerateUnary
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rpc(request)  # type: ignore[operator]
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert message in (raised.value.details() or "")
        assert not engine.requests
    finally:
        await stop_server(running)


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        (
            pb.ChatRequest(
                messages=[user("hi")],
                tools=[pb.Tool(function=pb.FunctionDefinition(name="f", parameters=struct({"maximum": math.inf})))],
            ),
            "tools[0].function.parameters has inf at maximum",
        ),
        (
            pb.ChatRequest(messages=[user("hi")], chat_template_kwargs=struct({"enable_thinking": math.nan})),
            "chat_template_kwargs has nan at enable_thinking",
        ),
        (
            pb.ChatRequest(
                messages=[user("hi")],
                sampling=common_pb2.SamplingParams(response_format=json_schema_format({"maximum": math.nan})),
            ),
            "sampling.response_format.json_schema has nan at maximum",
        ),
    ],
)
async def test_non_finite_struct_numbers_are_invalid_argument(request_: pb.ChatRequest, named: str) -> None:
    await assert_invalid(request_, f"{named}; numbers must be finite")


@pytest.mark.parametrize("kind", ["chat", "generate"])
async def test_a_non_string_dollar_schema_is_invalid_argument(kind: str) -> None:
    sampling = common_pb2.SamplingParams(response_format=json_schema_format({"$schema": 5, "type": "object"}))
    request = (
        pb.ChatRequest(messages=[user("hi")], sampling=sampling)
        if kind == "chat"
        else pb.GenerateRequest(text="hi", sampling=sampling)
    )
    await assert_invalid(request, "$schema must be a string")


@pytest.mark.parametrize("arguments", ["[" * 100_000, '{"a":' * 500 + "1" + "}" * 500])
async def test_deeply_nested_arguments_are_served(arguments: str) -> None:
    engine = FakeEngine(script=text_script([["ok"]]), context_length=1_000_000)
    running = await start_server(engine)
    try:
        result = await running.stub.ChatUnary(pb.ChatRequest(messages=called("f", arguments)))
        assert result.choices[0].text == "ok"
    finally:
        await stop_server(running)


async def test_a_long_function_name_is_over_max_prompt_chars() -> None:
    config = server_config(RequestLimits(max_prompt_chars=2_000))
    await assert_invalid(pb.ChatRequest(messages=called("f" * 50_000, "{}")), "at most 2000 allowed", config=config)


async def test_a_text_only_chat_is_measured_after_rendering() -> None:
    """The tools' definitions are rendered into the prompt but are no message's text."""
    config = server_config(RequestLimits(max_prompt_chars=2_000))
    tool = pb.Tool(function=pb.FunctionDefinition(name="f", description="d" * 3_000))
    request = pb.ChatRequest(messages=[user("hi")], tools=[tool])
    await assert_invalid(request, "the rendered conversation has", config=config)
