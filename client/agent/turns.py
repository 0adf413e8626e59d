"""One assistant turn as the agent sees it, and the assembly of streamed tool-call pieces.

Both surfaces stream a tool call as pieces keyed by the call's position (`index`): the first piece
carries the call's id and the function's name, later pieces add text to the arguments. The
assembler keeps the calls in index order and never drops one: a call whose arguments are not valid
JSON is still returned, and the agent loop reports that to the model instead of running it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCallRequest:
    """A whole tool call the model made; `arguments` is the JSON text exactly as the model wrote it."""

    id: str
    name: str
    arguments: str

    def as_message_entry(self) -> dict[str, Any]:
        """The call as an OpenAI assistant message's `tool_calls` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class AssistantTurn:
    """What the model answered in one turn: its text and the calls it made (possibly none)."""

    text: str
    tool_calls: tuple[ToolCallRequest, ...]
    finish_reason: str | None

    def as_message(self) -> dict[str, Any]:
        """The turn as an OpenAI-shaped assistant message, ready to send back in the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = [call.as_message_entry() for call in self.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        return message


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Joins tool-call pieces (index, id, name, arguments) into whole calls, in index order.

    A piece may repeat the id or name (some servers send them on every piece); the first non-empty
    value is kept. A call that never received an id gets `call_<turn>_<index>`, so that the tool
    message answering it can still reference it.
    """

    def __init__(self, id_prefix: str = "call") -> None:
        self._calls: dict[int, _PartialCall] = {}
        self._id_prefix = id_prefix

    def add(self, index: int, id: str | None, name: str | None, arguments: str | None) -> None:
        call = self._calls.setdefault(index, _PartialCall())
        if id and not call.id:
            call.id = id
        if name and not call.name:
            call.name = name
        if arguments:
            call.arguments.append(arguments)

    def calls(self) -> tuple[ToolCallRequest, ...]:
        return tuple(
            ToolCallRequest(
                id=call.id or f"{self._id_prefix}_{index}",
                name=call.name,
                arguments="".join(call.arguments),
            )
            for index, call in sorted(self._calls.items())
        )


@dataclass(frozen=True)
class ToolOutcome:
    """What running one tool call gave: the text the model gets back, and whether it is an error."""

    text: str
    is_error: bool = False

    def as_message_content(self) -> str:
        return f"error: {self.text}" if self.is_error else self.text
