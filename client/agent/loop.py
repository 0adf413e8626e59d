"""The agent's tool loop, the way Tiny-Agents runs one.

For each prompt: append the user message, then repeat up to `max_turns` times: send the
conversation and the tools, stream the answer, and if the model called tools, run every call
(concurrently), append the assistant message (with its `tool_calls`) and one `tool` message per
call (with its `tool_call_id`), and ask again. The loop ends when the model answers without calls.

Invariants:
- Every tool call the model makes is answered by exactly one `tool` message with its id, in the
  order of the calls, before the next request: a call whose arguments are not a JSON object, or
  that names an unknown tool, is not run, and its `tool` message tells the model what was wrong.
- tool_choice "required" applies to the first request of each prompt only; later requests of the
  same prompt use "auto", so the model can answer with the results it asked for.
- A failed turn (`ModelCallFailed`) leaves the conversation as it was before the prompt.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Protocol

from protoserve.client.agent.model_backends import ModelBackend
from protoserve.client.agent.turns import AssistantTurn, ToolCallRequest, ToolOutcome

TOOL_CHOICES = ("auto", "required", "none")


class Toolbox(Protocol):
    """The tools the agent may call (`McpToolbox`, or a fake in tests)."""

    def openai_tools(self) -> list[dict[str, Any]]: ...

    def names(self) -> list[str]: ...

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        """Run one tool; failures come back as an outcome with `is_error`, never as an exception."""
        ...


class AgentReporter:
    """Hears what the loop does. The default ignores everything; the CLI prints."""

    def text(self, piece: str) -> None:
        """A piece of the assistant's answer, as it streams."""

    def turn_finished(self, turn: AssistantTurn) -> None:
        """The model finished one turn (with or without calls)."""

    def tool_started(self, call: ToolCallRequest) -> None:
        """A call is about to run (or to be refused)."""

    def tool_finished(self, call: ToolCallRequest, outcome: ToolOutcome) -> None:
        """A call's outcome, as the model will read it."""


@dataclass(frozen=True)
class AgentAnswer:
    """How a prompt ended. `answered` is False when `max_turns` ran out while the model still called tools."""

    text: str
    turns: int
    tool_calls: int
    answered: bool


def parse_arguments(call: ToolCallRequest) -> dict[str, Any] | str:
    """The call's arguments as a dict, or a message saying why they cannot be used."""
    if not call.arguments.strip():
        return {}
    try:
        arguments = json.loads(call.arguments)
    except ValueError as error:
        return (
            f"the arguments of {call.name!r} are not valid JSON ({error}); the call was not run: {call.arguments[:500]}"
        )
    if not isinstance(arguments, dict):
        kind = type(arguments).__name__
        return f"the arguments of {call.name!r} must be a JSON object, got {kind}; the call was not run"
    return arguments


class AgentLoop:
    """A conversation with a model that may call the toolbox's tools. `messages` is the conversation so far."""

    def __init__(
        self,
        backend: ModelBackend,
        toolbox: Toolbox,
        *,
        system: str = "",
        max_turns: int = 10,
        tool_choice: str = "auto",
        reporter: AgentReporter | None = None,
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)}, got {tool_choice!r}")
        if tool_choice == "required" and not toolbox.names():
            raise ValueError("tool_choice 'required' needs at least one tool; connect an MCP server that has tools")
        self._backend = backend
        self._toolbox = toolbox
        self._max_turns = max_turns
        self._tool_choice = tool_choice
        self._reporter = reporter or AgentReporter()
        self._system = system
        self.messages: list[dict[str, Any]] = []
        self.clear()

    def clear(self) -> None:
        """Forget the conversation; the system message stays."""
        self.messages = [{"role": "system", "content": self._system}] if self._system else []

    async def ask(self, prompt: str) -> AgentAnswer:
        """Run the loop for one user prompt. Raises ModelCallFailed (the conversation is then unchanged)."""
        kept = len(self.messages)
        self.messages.append({"role": "user", "content": prompt})
        try:
            return await self._run()
        except BaseException:
            del self.messages[kept:]
            raise

    async def _run(self) -> AgentAnswer:
        tools = self._toolbox.openai_tools()
        calls_made = 0
        turn = AssistantTurn("", (), None)
        for number in range(1, self._max_turns + 1):
            tool_choice = "auto" if self._tool_choice == "required" and number > 1 else self._tool_choice
            turn = await self._backend.reply(
                self.messages, tools=tools, tool_choice=tool_choice, on_text=self._reporter.text
            )
            self._reporter.turn_finished(turn)
            self.messages.append(turn.as_message())
            if not turn.tool_calls:
                return AgentAnswer(turn.text, number, calls_made, answered=True)
            outcomes = await asyncio.gather(*(self._run_call(call) for call in turn.tool_calls))
            calls_made += len(turn.tool_calls)
            for call, outcome in zip(turn.tool_calls, outcomes, strict=True):
                self.messages.append({"role": "tool", "tool_call_id": call.id, "content": outcome.as_message_content()})
        return AgentAnswer(turn.text, self._max_turns, calls_made, answered=False)

    async def _run_call(self, call: ToolCallRequest) -> ToolOutcome:
        self._reporter.tool_started(call)
        arguments = parse_arguments(call)
        if isinstance(arguments, str):
            outcome = ToolOutcome(arguments, is_error=True)
        elif call.name not in self._toolbox.names():
            offered = ", ".join(self._toolbox.names()) or "none"
            outcome = ToolOutcome(f"there is no tool named {call.name!r}; the tools are: {offered}", is_error=True)
        else:
            try:
                outcome = await self._toolbox.call(call.name, arguments)
            except Exception as error:  # a toolbox should report failures itself; never let one end the loop
                outcome = ToolOutcome(f"tool {call.name!r} failed: {type(error).__name__}: {error}", is_error=True)
        self._reporter.tool_finished(call, outcome)
        return outcome
