"""What the streaming tool-call parser reports.

A choice's output becomes a sequence of events: `TextEvent`s for answer text, `ToolCallDelta`s for
calls (the first delta of a call carries its id and name with empty arguments; later deltas carry
pieces of the arguments' JSON text, which concatenate to a JSON object), and `ToolCallError`s for
calls that could not be used, and a `ToolCallEnd` after the last delta of each call that completed
and is valid (a consumer may hold a call's deltas until then, so it never passes on a call that is
later cut off or refused). Nothing the model wrote is silently dropped: an invalid call comes
back as a `ToolCallError` holding its raw text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextEvent:
    """Answer text outside any tool call."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call number `index`: id and name on its first delta, argument text after."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class ToolCallError:
    """A call that is not valid: bad JSON, unknown tool name, or cut off by the end of the output.

    `index` is set when deltas for this call were already emitted (the caller should discard them);
    it is None when the call was refused before any delta. `raw_text` is what the model wrote.
    """

    index: int | None
    raw_text: str
    message: str


@dataclass(frozen=True)
class ToolCallEnd:
    """Call number `index` is complete and valid: all its deltas were emitted before this event."""

    ended_index: int


@dataclass(frozen=True)
class ParsedToolCall:
    """A complete, valid call. `arguments` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


ParseEvent = TextEvent | ToolCallDelta | ToolCallError | ToolCallEnd
