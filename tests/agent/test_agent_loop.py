"""AgentLoop with a fake model backend and a fake toolbox: message shapes, concurrency, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from protoserve.client.agent.loop import AgentLoop, AgentReporter, parse_arguments
from protoserve.client.agent.model_backends import ModelCallFailed
from protoserve.client.agent.turns import AssistantTurn, ToolCallAssembler, ToolCallRequest, ToolOutcome


@dataclass
class ScriptedBackend:
    """Returns the scripted turns in order (streaming each turn's text in two pieces); an exception is raised."""

    turns: list[AssistantTurn | Exception]
    requests: list[dict[str, Any]] = field(default_factory=list)
    where: str = "scripted"

    async def reply(
        self, messages: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]], tool_choice: str, on_text: Any
    ) -> AssistantTurn:
        self.requests.append(
            {"messages": [dict(m) for m in messages], "tools": list(tools), "tool_choice": tool_choice}
        )
        turn = self.turns.pop(0)
        if isinstance(turn, Exception):
            raise turn
        middle = len(turn.text) // 2
        for piece in (turn.text[:middle], turn.text[middle:]):
            if piece:
                on_text(piece)
        return turn

    async def close(self) -> None:
        return None


@dataclass
class RendezvousToolbox:
    """`add` and `multiply`; each call waits until `expected_concurrent` calls are running at once."""

    expected_concurrent: int = 1
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _running: int = 0
    _everyone_here: asyncio.Event = field(default_factory=asyncio.Event)

    def openai_tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": name, "parameters": {}}} for name in self.names()]

    def names(self) -> list[str]:
        return ["add", "multiply"]

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        self.calls.append((name, arguments))
        self._running += 1
        if self._running >= self.expected_concurrent:
            self._everyone_here.set()
        await asyncio.wait_for(self._everyone_here.wait(), 5)
        if name == "add":
            return ToolOutcome(str(arguments["a"] + arguments["b"]))
        return ToolOutcome(str(arguments["a"] * arguments["b"]))


def calls_turn(*calls: tuple[str, str, str], text: str = "") -> AssistantTurn:
    return AssistantTurn(text, tuple(ToolCallRequest(*call) for call in calls), "tool_calls")


def answer(text: str) -> AssistantTurn:
    return AssistantTurn(text, (), "stop")


class RecordingReporter(AgentReporter):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def text(self, piece: str) -> None:
        self.events.append(("text", piece))

    def tool_started(self, call: ToolCallRequest) -> None:
        self.events.append(("start", call.name))

    def tool_finished(self, call: ToolCallRequest, outcome: ToolOutcome) -> None:
        self.events.append(("done", outcome.as_message_content()))


async def test_parallel_calls_run_concurrently_and_are_answered_in_order() -> None:
    backend = ScriptedBackend(
        [
            calls_turn(("c1", "add", '{"a": 2, "b": 3}'), ("c2", "multiply", '{"a": 4, "b": 5}'), text="Let me see."),
            answer("2 + 3 = 5 and 4 * 5 = 20."),
        ]
    )
    toolbox = RendezvousToolbox(expected_concurrent=2)  # would time out if the calls ran one after the other
    reporter = RecordingReporter()
    agent = AgentLoop(backend, toolbox, system="Be brief.", reporter=reporter)
    result = await agent.ask("What are 2 + 3 and 4 * 5?")
    assert (result.text, result.turns, result.tool_calls, result.answered) == ("2 + 3 = 5 and 4 * 5 = 20.", 2, 2, True)
    assert agent.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What are 2 + 3 and 4 * 5?"},
        {
            "role": "assistant",
            "content": "Let me see.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
                {"id": "c2", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 4, "b": 5}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "content": "20"},
        {"role": "assistant", "content": "2 + 3 = 5 and 4 * 5 = 20."},
    ]
    assert backend.requests[1]["messages"] == agent.messages[:-1]
    assert [request["tool_choice"] for request in backend.requests] == ["auto", "auto"]
    assert [tool["function"]["name"] for tool in backend.requests[0]["tools"]] == ["add", "multiply"]
    assert "".join(piece for kind, piece in reporter.events if kind == "text") == "Let me see.2 + 3 = 5 and 4 * 5 = 20."
    assert {event for event in reporter.events if event[0] == "done"} == {("done", "5"), ("done", "20")}


async def test_bad_calls_are_reported_to_the_model_and_not_run() -> None:
    backend = ScriptedBackend(
        [
            calls_turn(
                ("c1", "add", '{"a": 2, "b": '),  # cut-off JSON
                ("c2", "add", "[2, 3]"),  # JSON, but not an object
                ("c3", "subtract", '{"a": 5, "b": 3}'),  # no such tool
                ("c4", "multiply", '{"a": 6, "b": 7}'),  # fine
            ),
            answer("Only the product worked: 42."),
        ]
    )
    toolbox = RendezvousToolbox()
    agent = AgentLoop(backend, toolbox)
    result = await agent.ask("compute")
    assert result.answered and toolbox.calls == [("multiply", {"a": 6, "b": 7})]
    tool_messages = [message for message in agent.messages if message["role"] == "tool"]
    assert [message["tool_call_id"] for message in tool_messages] == ["c1", "c2", "c3", "c4"]
    contents = [message["content"] for message in tool_messages]
    assert (
        contents[0].startswith("error: the arguments of 'add' are not valid JSON") and '{"a": 2, "b": ' in contents[0]
    )
    assert contents[1] == "error: the arguments of 'add' must be a JSON object, got list; the call was not run"
    assert contents[2] == "error: there is no tool named 'subtract'; the tools are: add, multiply"
    assert contents[3] == "42"


async def test_required_applies_to_the_first_request_of_each_prompt() -> None:
    backend = ScriptedBackend(
        [calls_turn(("c1", "add", '{"a": 1, "b": 1}')), answer("2"), calls_turn(("c2", "add", "")), answer("?")]
    )
    agent = AgentLoop(backend, RendezvousToolbox(), tool_choice="required")
    await agent.ask("1 + 1?")
    await agent.ask("again")
    assert [request["tool_choice"] for request in backend.requests] == ["required", "auto", "required", "auto"]
    # An empty arguments text means no arguments; a toolbox that raises is reported, not fatal.
    assert agent.messages[-2] == {
        "role": "tool",
        "tool_call_id": "c2",
        "content": "error: tool 'add' failed: KeyError: 'a'",
    }


async def test_max_turns_stops_a_model_that_keeps_calling() -> None:
    backend = ScriptedBackend([calls_turn((f"c{n}", "add", '{"a": 1, "b": 2}')) for n in range(3)])
    agent = AgentLoop(backend, RendezvousToolbox(), max_turns=3)
    result = await agent.ask("loop")
    assert (result.answered, result.turns, result.tool_calls) == (False, 3, 3)
    assert agent.messages[-1] == {"role": "tool", "tool_call_id": "c2", "content": "3"}


async def test_a_failed_turn_leaves_the_conversation_unchanged() -> None:
    backend = ScriptedBackend(
        [calls_turn(("c1", "add", '{"a": 1, "b": 2}')), ModelCallFailed("server gone"), answer("fine")]
    )
    agent = AgentLoop(backend, RendezvousToolbox(), system="sys")
    with pytest.raises(ModelCallFailed, match="server gone"):
        await agent.ask("first")
    assert agent.messages == [{"role": "system", "content": "sys"}]
    assert (await agent.ask("second")).text == "fine"
    agent.clear()
    assert agent.messages == [{"role": "system", "content": "sys"}]


def test_loop_settings_are_checked() -> None:
    backend = ScriptedBackend([])

    class NoTools(RendezvousToolbox):
        def names(self) -> list[str]:
            return []

    with pytest.raises(ValueError, match="max_turns"):
        AgentLoop(backend, RendezvousToolbox(), max_turns=0)
    with pytest.raises(ValueError, match="tool_choice"):
        AgentLoop(backend, RendezvousToolbox(), tool_choice="sometimes")
    with pytest.raises(ValueError, match="needs at least one tool"):
        AgentLoop(backend, NoTools(), tool_choice="required")


def test_streamed_pieces_assemble_into_calls() -> None:
    assembler = ToolCallAssembler("call_7")
    assembler.add(1, "b", "multiply", "")
    assembler.add(0, "a", "add", '{"a": ')
    assembler.add(1, "b", "multiply", '{"a": 4, "b": 5}')  # id and name repeated: kept once
    assembler.add(0, None, None, "1}")
    assembler.add(2, None, "list_files", '{"directory": "."}')  # never given an id
    assert assembler.calls() == (
        ToolCallRequest("a", "add", '{"a": 1}'),
        ToolCallRequest("b", "multiply", '{"a": 4, "b": 5}'),
        ToolCallRequest("call_7_2", "list_files", '{"directory": "."}'),
    )


def test_arguments_parsing() -> None:
    assert parse_arguments(ToolCallRequest("i", "f", "  ")) == {}
    assert parse_arguments(ToolCallRequest("i", "f", '{"x": [1, {"y": null}]}')) == {"x": [1, {"y": None}]}
    assert "not valid JSON" in str(parse_arguments(ToolCallRequest("i", "f", "{'x': 1}")))
    assert "got str" in str(parse_arguments(ToolCallRequest("i", "f", '"text"')))
