"""Chat with the real parsers of `protoserve.server.parsing` (the servicer's defaults)."""

from __future__ import annotations

import copy
import json

import torch
from google.protobuf import struct_pb2
from protoserve.server.chat.parsing_hooks import default_chat_parsing
from protoserve.server.engine.api import FinishReason
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


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


async def test_a_call_cut_by_max_tokens_is_text_and_the_calls_before_it_stay_valid() -> None:
    pieces = [CALL[:30], CALL[30:], "\n<tool_call>\n", '{"name": "get_weather", ', '"arguments": {"city": "Be']
    engine = FakeEngine(script=text_script([pieces], finish=FinishReason.LENGTH))
    running = await start_server(engine, parsing=default_chat_parsing())
    try:
        chunks = [chunk async for chunk in running.stub.Chat(ask("weather?"))]
        result = await running.stub.ChatUnary(ask("weather?"))
    finally:
        await stop_server(running)
    deltas = [choice for chunk in chunks for choice in chunk.choices]
    streamed = [piece for delta in deltas for piece in delta.tool_calls]
    assert {piece.index for piece in streamed} == {0}, "the cut-off call must never be streamed as a call"
    assert json.loads("".join(piece.arguments for piece in streamed)) == {"city": "Oslo"}
    streamed_text = "".join(delta.text for delta in deltas)
    assert streamed_text == '{"name": "get_weather", "arguments": {"city": "Be'
    # OpenAI says "length" when the output was cut; unary is the joined stream.
    assert deltas[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    choice = result.choices[0]
    assert [(call.function.name, json.loads(call.function.arguments)) for call in choice.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert choice.text == streamed_text and choice.finish_reason == common_pb2.FINISH_REASON_LENGTH


PLAIN_TEMPLATE = (  # like SmolLM2's: reads neither `tools` nor `tool_calls`
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


async def test_a_template_without_tools_gets_a_tool_prompt_and_the_hermes_fallback() -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = PLAIN_TEMPLATE
    engine = FakeEngine(script=text_script([[CALL]]), context_length=8192)
    running = await start_server(engine, parsing=default_chat_parsing(), tokenizer=tokenizer)
    earlier_call = pb.ToolCall(
        id="call_1", type="function", function=pb.FunctionCall(name="get_weather", arguments='{"city": "Rome"}')
    )
    history = [
        pb.ChatMessage(role="system", content=[pb.ContentPart(text="Be brief.")]),
        pb.ChatMessage(role="user", content=[pb.ContentPart(text="weather in Rome?")]),
        pb.ChatMessage(role="assistant", tool_calls=[earlier_call]),
        pb.ChatMessage(role="tool", tool_call_id="call_1", content=[pb.ContentPart(text="sunny")]),
        pb.ChatMessage(role="user", content=[pb.ContentPart(text="and Oslo?")]),
    ]
    try:
        request = pb.ChatRequest(
            messages=history, tools=[weather_tool()], tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)
        )
        result = await running.stub.ChatUnary(request)
        plain = await running.stub.ChatUnary(pb.ChatRequest(messages=history[:2]))
    finally:
        await stop_server(running)
    prompt = tokenizer.decode(engine.requests[0].prompt_token_ids)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools")
    assert '"name": "get_weather"' in system and '<tool_call>\n{"name": "<function name>"' in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}' in prompt
    assert engine.requests[0].params.constraint_factory is not None  # the hermes grammar, forced
    assert result.choices[0].tool_calls[0].function.name == "get_weather"
    assert result.choices[0].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    # Without tools nothing is added.
    assert "You can call" not in tokenizer.decode(engine.requests[1].prompt_token_ids)
    assert plain.choices[0].text == CALL  # no tools offered: the output is not parsed
