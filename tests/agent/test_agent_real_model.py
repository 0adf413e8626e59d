"""The real SmolLM2-135M-Instruct demo model behind the real server: with tool_choice "required"
(or a named function) every reply must be a parseable call, whatever the prompt. This is what
constrained decoding promises; the small model calls tools unreliably without it.

SmolLM2's chat template names no tool-call format and never shows `tools`, so the server runs as the
demo stack does (`--tool-parser auto`): it falls back to hermes and lists the tools in a system text.
All prompts go at once (one batch), greedy, so the test takes one model load and one decode.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest
from protoserve.client import AsyncProtoserveClient, Reply

pytest.importorskip("torch")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "list_files",
            "description": "List the files in a directory.",
            "parameters": {
                "type": "object",
                "properties": {"directory": {"type": "string"}},
                "required": ["directory"],
            },
        },
    },
]
STRICT_TOOLS = [
    {
        **tool,
        "function": {
            **tool["function"],
            "parameters": {**tool["function"]["parameters"], "additionalProperties": False},
        },
    }
    for tool in TOOLS
]
TOOL_NAMES = {"add", "list_files"}
# (prompt, tool_choice, the tool names a call may have)
CASES: list[tuple[str, Any, set[str]]] = [
    ("What is 2 + 3?", "required", TOOL_NAMES),
    ("Which files are in the folder notes?", "required", TOOL_NAMES),
    ("Hello, how are you today?", "required", TOOL_NAMES),
    ("Write a poem about the sea.", {"type": "function", "function": {"name": "add"}}, {"add"}),
]
MAX_TOKENS = 80


def problems_of(reply: Reply, allowed: set[str]) -> list[str]:
    """What is wrong with a reply that had to be a tool call, in words (empty when it is fine)."""
    problems = []
    if not reply.tool_calls:
        problems.append(f"no tool call; text {reply.text!r}")
    for call in reply.tool_calls:
        if call.name not in allowed:
            problems.append(f"call to {call.name!r}, not one of {sorted(allowed)}")
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            problems.append(f"arguments of {call.name!r} are not JSON: {call.arguments!r}")
            continue
        if not isinstance(arguments, dict):
            problems.append(f"arguments of {call.name!r} are not an object: {call.arguments!r}")
    if reply.finish_reason != "tool_calls":
        problems.append(f"finish_reason {reply.finish_reason!r}, expected 'tool_calls'")
    return problems


@dataclass(frozen=True)
class ForcedReplies:
    """One reply per case: as agents send them (parallel calls allowed, schemas as given), and with
    `additionalProperties: false` in every schema and `parallel_tool_calls` false."""

    default: list[Reply]
    strict: list[Reply]


async def forced_replies(chat_model_path: Any) -> ForcedReplies:
    from protoserve.server.app import start_server
    from protoserve.server.config import ModelSpec, ServerConfig
    from protoserve.server.engine.api import EngineConfig

    config = ServerConfig(
        models=(ModelSpec("smollm2", str(chat_model_path)),),
        port=0,
        device="cpu",
        tool_parser="auto",
        warm_up=False,
        engine=EngineConfig(kv_cache_bytes=64 << 20),
    )
    running = await start_server(config)
    try:
        async with AsyncProtoserveClient(running.addresses[0], timeout=300) as client:
            requests = [
                client.chat(
                    [{"role": "user", "content": prompt}],
                    tools=tools,
                    tool_choice=tool_choice,
                    temperature=0.0,
                    max_tokens=MAX_TOKENS,
                    **options,
                )
                for tools, options in ((TOOLS, {}), (STRICT_TOOLS, {"parallel_tool_calls": False}))
                for prompt, tool_choice, _ in CASES
            ]
            replies = list(await asyncio.gather(*requests))
            return ForcedReplies(default=replies[: len(CASES)], strict=replies[len(CASES) :])
    finally:
        await running.abort()


@pytest.fixture(scope="module")
def replies(request: pytest.FixtureRequest) -> ForcedReplies:
    """One reply per case, from one server run shared by this module's tests."""
    try:
        chat_model_path = request.getfixturevalue("chat_model_path")
    except Exception as error:  # the demo-model fetch is another engineer's part; skip only these tests
        pytest.skip(f"the chat demo model is not available ({type(error).__name__}: {error})")
    return asyncio.run(forced_replies(chat_model_path))


def report(replies: list[Reply], check: Any) -> str:
    lines = []
    for (prompt, tool_choice, allowed), reply in zip(CASES, replies, strict=True):
        problems = check(reply, allowed)
        if problems:
            calls = [(call.name, call.arguments) for call in reply.tool_calls]
            lines.append(f"{prompt!r} (tool_choice {tool_choice}): {'; '.join(problems)}; calls {calls}")
    return "\n".join(lines)


def test_every_forced_reply_starts_with_a_call_to_an_allowed_tool(replies: ForcedReplies) -> None:
    for (prompt, _, allowed), reply in zip(CASES * 2, replies.default + replies.strict, strict=True):
        assert reply.tool_calls, f"{prompt!r}: no tool call, text {reply.text!r}"
        assert reply.tool_calls[0].name in allowed, f"{prompt!r}: {reply.tool_calls}"
        assert reply.text.strip() == "", f"{prompt!r}: text next to a forced call: {reply.text!r}"


def test_every_forced_call_is_parseable(replies: ForcedReplies) -> None:
    def check(reply: Reply, allowed: set[str]) -> list[str]:
        return [problem for problem in problems_of(reply, allowed) if not problem.startswith("finish_reason")]

    problems = report(replies.default, check)
    assert not problems, problems


def test_forced_calls_finish_with_tool_calls(replies: ForcedReplies) -> None:
    problems = report(replies.default, problems_of)
    assert not problems, problems


def test_strict_schemas_without_parallel_calls_give_one_clean_call(replies: ForcedReplies) -> None:
    problems = report(replies.strict, problems_of)
    assert not problems, problems
    assert all(len(reply.tool_calls) == 1 for reply in replies.strict)
