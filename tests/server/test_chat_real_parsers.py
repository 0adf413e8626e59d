"""Chat with the real parsers of `protoserve.server.parsing` (the servicer's defaults)."""

from __future__ import annotations

import json

import torch
from google.protobuf import struct_pb2
from protoserve.server.chat.parsing_hooks import default_chat_parsing
from protoserve.v1 import common_pb2
from protoserve.v1 import generation_pb2 as pb

try:
    from .generation_fakes import FakeEngine, RunningServer, start_server, stop_server, text_script, tiny_tokenizer
except ImportError:
    from generation_fakes import (  # type: ignore[no-redef]
        FakeEngine,
        RunningServer,
        start_server,
        stop_server,
        text_script,
        tiny_tokenizer,
    )


def weather_tool() -> pb.Tool:
    parameters = struct_pb2.Struct()
    parameters.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return pb.Tool(type="function", function=pb.FunctionDefinition(name="get_weather", parameters=parameters))


def ask(text: str, **fields: object) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text=text)])],
        tools=[weather_tool()],
        **fields,  # type: ignore[arg-type]
    )


async def serve(pieces: list[str]) -> tuple[RunningServer, FakeEngine]:
    engine = FakeEngine(script=text_script([pieces]))
    return await start_server(engine, parsing=default_chat_parsing()), engine


async def test_hermes_tool_call_with_reasoning() -> None:
    pieces = [
        "<think>", "user wants weather", "</think>", "\n\nChecking.", "\n<tool_call>\n",
        '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}', "\n</tool_call>",
    ]  # fmt: skip
    running, _ = await serve(pieces)
    try:
        chunks = [chunk async for chunk in running.stub.Chat(ask("weather?"))]
        result = await running.stub.ChatUnary(ask("weather?"))
    finally:
        await stop_server(running)
    deltas = [choice for chunk in chunks for choice in chunk.choices]
    assert "".join(delta.reasoning_text for delta in deltas) == "user wants weather"
    assert "".join(delta.text for delta in deltas) == "Checking."
    pieces_seen = [piece for delta in deltas for piece in delta.tool_calls]
    assert pieces_seen[0].name == "get_weather" and pieces_seen[0].id
    assert json.loads("".join(piece.arguments for piece in pieces_seen)) == {"city": "Paris"}
    assert deltas[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    call = result.choices[0].tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert result.choices[0].reasoning_text == "user wants weather" and result.choices[0].text == "Checking."


async def test_call_to_an_unknown_tool_comes_back_as_text() -> None:
    raw = '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>'
    running, _ = await serve([raw])
    try:
        result = await running.stub.ChatUnary(ask("go"))
    finally:
        await stop_server(running)
    assert not result.choices[0].tool_calls
    assert "launch_rockets" in result.choices[0].text
    assert result.choices[0].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_required_tool_choice_uses_the_real_forced_grammar() -> None:
    running, engine = await serve(['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'])
    try:
        request = ask("weather?", tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED))
        result = await running.stub.ChatUnary(request)
    finally:
        await stop_server(running)
    factory = engine.requests[0].params.constraint_factory
    assert factory is not None
    tokenizer = tiny_tokenizer()
    mask = factory().allowed_token_mask(len(tokenizer))
    allowed = [tokenizer.decode([token_id]) for token_id in torch.nonzero(mask).flatten().tolist()]
    assert allowed and all("<tool_call>".startswith(text) or text.startswith("<tool_call>") for text in allowed)
    assert result.choices[0].tool_calls[0].function.name == "get_weather"
    assert result.choices[0].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
