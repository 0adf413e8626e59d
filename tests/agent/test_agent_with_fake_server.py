"""The agent loop over gRPC against a fake protoserve (scripted Chat replies) and the real test MCP
server: the tool runs, its result goes back as a `tool` message with the call's id, parallel
calls, invalid arguments, tool_choice on the wire, and server failures."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TextIO

import pytest
from protoserve.client.agent.loop import AgentLoop
from protoserve.client.agent.mcp_toolbox import McpServerSpec, McpToolbox
from protoserve.client.agent.model_backends import GrpcModelBackend, ModelCallFailed
from protoserve.v1 import generation_pb2

from .conftest import read_call_log
from .fake_protoserve import FakeProtoserve, Reply, message_text, start_fake_protoserve, text_reply, tool_call_reply


async def agent_against(
    replies: list[Reply], toolbox: McpToolbox, stack: AsyncExitStack, **options: object
) -> tuple[AgentLoop, FakeProtoserve]:
    fake = await start_fake_protoserve(replies)
    stack.push_async_callback(fake.stop)
    backend = GrpcModelBackend(fake.address, timeout=20)
    stack.push_async_callback(backend.close)
    return AgentLoop(backend, toolbox, **options), fake  # type: ignore[arg-type]


def tool_messages(request: generation_pb2.ChatRequest) -> list[tuple[str, str]]:
    return [(message.tool_call_id, message_text(message)) for message in request.messages if message.role == "tool"]


async def test_a_tool_call_runs_on_the_stdio_server_and_its_result_goes_back(
    stdio_command: Callable[..., str], call_log: Path, server_stderr: TextIO
) -> None:
    async with AsyncExitStack() as stack:
        toolbox = await McpToolbox.connect([McpServerSpec.stdio(stdio_command())], stack, errlog=server_stderr)
        replies = [
            tool_call_reply([("call_add_1", "add", '{"a": 2, "b": 3}')], text="I will add them. "),
            text_reply("2 + 3 = ", "5."),
        ]
        agent, fake = await agent_against(replies, toolbox, stack, system="You can use tools.")
        answer = await agent.ask("What is 2 + 3?")

        assert (answer.text, answer.answered, answer.turns, answer.tool_calls) == ("2 + 3 = 5.", True, 2, 1)
        assert [entry for entry in read_call_log(call_log) if "tool" in entry] == [
            {"server": "calculator", "tool": "add", "arguments": {"a": 2, "b": 3}}
        ]
        first, second = fake.requests
        assert [tool.function.name for tool in first.tools] == ["add", "multiply", "list_files"]
        assert first.tools[0].function.parameters["required"] == ["a", "b"]
        assert first.tool_choice.mode == generation_pb2.ToolChoice.MODE_AUTO
        assert [message.role for message in first.messages] == ["system", "user"]
        assert [message.role for message in second.messages] == ["system", "user", "assistant", "tool"]
        assistant = second.messages[2]
        assert message_text(assistant) == "I will add them. "
        assert [(call.id, call.function.name) for call in assistant.tool_calls] == [("call_add_1", "add")]
        assert json.loads(assistant.tool_calls[0].function.arguments) == {"a": 2, "b": 3}
        assert tool_messages(second) == [("call_add_1", "5")]


async def test_parallel_calls_all_run_and_are_answered_by_id(http_mcp_url: str, call_log: Path) -> None:
    async with AsyncExitStack() as stack:
        toolbox = await McpToolbox.connect([McpServerSpec.http(http_mcp_url)], stack)
        replies = [
            tool_call_reply(
                [
                    ("call_a", "add", '{"a": 2, "b": 3}'),
                    ("call_m", "multiply", '{"a": 4, "b": 5}'),
                    ("call_l", "list_files", '{"directory": "notes"}'),
                ]
            ),
            text_reply("5, 20 and todo.md"),
        ]
        agent, fake = await agent_against(replies, toolbox, stack)
        answer = await agent.ask("Add 2 and 3, multiply 4 by 5, and list the notes.")
        assert answer.text == "5, 20 and todo.md" and answer.tool_calls == 3
        assert sorted(entry["tool"] for entry in read_call_log(call_log)) == ["add", "list_files", "multiply"]
        assert tool_messages(fake.requests[1]) == [("call_a", "5"), ("call_m", "20"), ("call_l", "todo.md")]
        assert [call.id for call in fake.requests[1].messages[1].tool_calls] == ["call_a", "call_m", "call_l"]


async def test_invalid_calls_become_error_messages_and_the_model_recovers(http_mcp_url: str, call_log: Path) -> None:
    async with AsyncExitStack() as stack:
        toolbox = await McpToolbox.connect([McpServerSpec.http(http_mcp_url)], stack)
        replies = [
            tool_call_reply(
                [
                    ("bad_json", "add", '{"a": 2, "b": 3'),
                    ("bad_type", "add", '{"a": "two", "b": 3}'),
                    ("unknown", "divide", '{"a": 6, "b": 3}'),
                    ("escape", "list_files", '{"directory": "../.."}'),
                ]
            ),
            tool_call_reply([("retry", "add", '{"a": 2, "b": 3}')]),
            text_reply("It is 5."),
        ]
        agent, fake = await agent_against(replies, toolbox, stack)
        answer = await agent.ask("2 + 3?")
        assert (answer.text, answer.turns) == ("It is 5.", 3)
        errors = dict(tool_messages(fake.requests[1]))
        assert list(errors) == ["bad_json", "bad_type", "unknown", "escape"]
        assert errors["bad_json"].startswith("error: the arguments of 'add' are not valid JSON")
        assert errors["bad_type"].startswith("error:") and "valid integer" in errors["bad_type"]
        assert errors["unknown"] == "error: there is no tool named 'divide'; the tools are: add, multiply, list_files"
        assert errors["escape"].startswith("error:") and "outside the served folder" in errors["escape"]
        assert tool_messages(fake.requests[2])[-1] == ("retry", "5")
        # The malformed call never reached the server; the one with a wrong type was refused by it.
        ran = [(entry["tool"], entry["arguments"]) for entry in read_call_log(call_log)]
        assert ran == [("list_files", {"directory": "../.."}), ("add", {"a": 2, "b": 3})]


async def test_tool_choice_goes_on_the_wire(http_mcp_url: str) -> None:
    async with AsyncExitStack() as stack:
        toolbox = await McpToolbox.connect([McpServerSpec.http(http_mcp_url)], stack)
        replies = [tool_call_reply([("c", "add", '{"a": 1, "b": 1}')]), text_reply("2")]
        agent, fake = await agent_against(replies, toolbox, stack, tool_choice="required")
        await agent.ask("1 + 1")
        modes = [request.tool_choice.mode for request in fake.requests]
        assert modes == [generation_pb2.ToolChoice.MODE_REQUIRED, generation_pb2.ToolChoice.MODE_AUTO]

        none_agent, none_fake = await agent_against([text_reply("no tools used")], toolbox, stack, tool_choice="none")
        assert (await none_agent.ask("hi")).text == "no tools used"
        assert none_fake.requests[0].tool_choice.mode == generation_pb2.ToolChoice.MODE_NONE


async def test_server_failures_raise_and_keep_the_conversation(http_mcp_url: str) -> None:
    async with AsyncExitStack() as stack:
        toolbox = await McpToolbox.connect([McpServerSpec.http(http_mcp_url)], stack)
        agent, fake = await agent_against([], toolbox, stack)  # the script is empty: Chat fails
        with pytest.raises(ModelCallFailed, match="FAILED_PRECONDITION"):
            await agent.ask("hello")
        assert agent.messages == []

        cut_short = tool_call_reply([("c", "add", '{"a": 1, "b": 1}')])[:-1]  # no finish reason
        agent, _ = await agent_against([cut_short], toolbox, stack)
        with pytest.raises(ModelCallFailed, match="ended before the model finished"):
            await agent.ask("hello")

        backend = GrpcModelBackend("127.0.0.1:9", timeout=5)
        stack.push_async_callback(backend.close)
        with pytest.raises(ModelCallFailed, match="127.0.0.1:9: UNAVAILABLE"):
            await AgentLoop(backend, toolbox).ask("hello")
