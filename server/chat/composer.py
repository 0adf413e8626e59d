"""Splits one choice's generated text into answer text, reasoning text and tool-call pieces.

Text flows through two optional stream parsers, in this order: the reasoning parser takes out
`<think>...</think>` sections, then the tool-call parser takes tool calls out of the answer text.
Both may hold text back until they know what it is; `finish()` releases whatever is left.
The composer holds no protobuf; `convert.py` turns its output into messages.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class ToolCallParser(Protocol):
    """A streaming tool-call parser (see `protoserve.server.parsing.tool_calls`).

    Events are text events (with `.text`), tool-call deltas (with `.index`, `.id`, `.name`,
    `.arguments`; id and name only on a call's first delta), call ends (with `.ended_index`: that
    call is complete and valid) and refused calls (with `.raw_text` and `.message`, and `.index` set
    when deltas of that call were already emitted).
    """

    def feed(self, text: str) -> list[Any]: ...

    def finish(self) -> list[Any]: ...


class ReasoningParser(Protocol):
    """A streaming reasoning splitter (see `protoserve.server.parsing.reasoning`)."""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) released by this piece of text."""
        ...

    def flush(self) -> tuple[str, str]:
        """(reasoning, content) still held back at the end of the output."""
        ...


@dataclass(frozen=True)
class ToolCallPiece:
    """A piece of one tool call: the first piece of a call has its id and name."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class ComposedText:
    """What one step of one choice means, once parsed."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallPiece] = field(default_factory=list)

    def extend(self, other: ComposedText) -> None:
        self.text += other.text
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)


class ChoiceComposer:
    """Parses one choice's text as it streams. Invariant: every character fed comes out exactly once,
    as answer text, reasoning text or part of a tool call (markup such as `<think>` may be dropped).

    Tool calls are passed on whole: a call's pieces are held until the parser says it ended valid
    (or, for a parser without end events, until the output ends without the parser refusing it).
    So a call cut off by max_tokens, or otherwise refused, never reaches the caller as a call with
    broken arguments; its raw text comes back as answer text instead, and it is logged. Passed-on
    calls are numbered 0, 1, 2... in order, whatever the parser numbered the refused ones.

    `reasoning_tokens` counts the tokens of steps that produced reasoning and no answer text, plus
    steps with no released text while the choice is inside a reasoning section.
    With `parallel_tool_calls=False` only the first valid tool call is kept.
    """

    def __init__(
        self,
        *,
        reasoning_parser: ReasoningParser | None = None,
        tool_parser: ToolCallParser | None = None,
        parallel_tool_calls: bool = True,
    ) -> None:
        self._reasoning_parser = reasoning_parser
        self._tool_parser = tool_parser
        self._parallel_tool_calls = parallel_tool_calls
        self._inside_reasoning = False
        self.reasoning_tokens = 0
        self._held_calls: dict[int, list[ToolCallPiece]] = {}  # by the parser's index, in arrival order
        self._passed_calls = 0

    @property
    def called_tools(self) -> bool:
        """True once at least one valid tool call was passed on."""
        return self._passed_calls > 0

    def feed(self, text: str, token_count: int) -> ComposedText:
        """Parse the text of one engine step, which generated `token_count` tokens."""
        if self._reasoning_parser is None:
            reasoning, content = "", text
        else:
            reasoning, content = self._reasoning_parser.feed(text) if text else ("", "")
        composed = self._compose(reasoning, content, final=False)
        if reasoning and not content:
            self._inside_reasoning = True
        elif content:
            self._inside_reasoning = False
        if self._inside_reasoning:
            self.reasoning_tokens += token_count
        return composed

    def finish(self) -> ComposedText:
        """Release everything the parsers still hold; call once, when the choice has ended."""
        reasoning, content = self._reasoning_parser.flush() if self._reasoning_parser is not None else ("", "")
        return self._compose(reasoning, content, final=True)

    def _compose(self, reasoning: str, content: str, *, final: bool) -> ComposedText:
        composed = ComposedText(reasoning=reasoning)
        if self._tool_parser is None:
            composed.text = content
            return composed
        events = self._tool_parser.feed(content) if content else []
        if final:
            events = [*events, *self._tool_parser.finish()]
        for event in events:
            if hasattr(event, "raw_text"):  # a call the parser refused
                if event.index is not None:
                    self._held_calls.pop(event.index, None)
                logger.info("a tool call was not valid and is returned as text: %s", event.message)
                composed.text += event.raw_text
            elif hasattr(event, "ended_index"):
                self._pass_on(self._held_calls.pop(event.ended_index, []), composed)
            elif hasattr(event, "arguments"):
                piece = ToolCallPiece(
                    index=event.index, id=event.id or "", name=event.name or "", arguments=event.arguments or ""
                )
                self._held_calls.setdefault(event.index, []).append(piece)
            else:
                composed.text += event.text
        if final:  # the parser refused none of these: they are complete
            for pieces in self._held_calls.values():
                self._pass_on(pieces, composed)
            self._held_calls.clear()
        return composed

    def _pass_on(self, pieces: list[ToolCallPiece], composed: ComposedText) -> None:
        if not pieces or (self._passed_calls > 0 and not self._parallel_tool_calls):
            return
        index = self._passed_calls
        self._passed_calls += 1
        composed.tool_calls.extend(dataclasses.replace(piece, index=index) for piece in pieces)
