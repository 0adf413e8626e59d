"""Splits one choice's generated text into answer text, reasoning text and tool-call pieces.

Text flows through two optional stream parsers, in this order: the reasoning parser takes out
`<think>...</think>` sections, then the tool-call parser takes tool calls out of the answer text.
Both may hold text back until they know what it is; `finish()` releases whatever is left.
The composer holds no protobuf; `convert.py` turns its output into messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class ToolCallParser(Protocol):
    """A streaming tool-call parser (see `protoserve.server.parsing.tool_calls`).

    Events are text events (with `.text`), tool-call deltas (with `.index`, `.id`, `.name`,
    `.arguments`; id and name only on a call's first delta) and refused calls (with `.raw_text`,
    and `.index` set when deltas of that call were already emitted).
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

    A refused call that was never announced comes back as answer text; one that was already
    streamed cannot be taken back, so it stays as sent and does not count as a call for the
    finish reason.

    `reasoning_tokens` counts the tokens of steps that produced reasoning and no answer text, plus
    steps with no released text while the choice is inside a reasoning section.
    With `parallel_tool_calls=False` only the first tool call is kept.
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
        self._announced_calls: set[int] = set()
        self._failed_calls: set[int] = set()

    @property
    def called_tools(self) -> bool:
        """True once at least one tool call was announced and not refused by the parser."""
        return bool(self._announced_calls - self._failed_calls)

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
                if event.index is None:
                    composed.text += event.raw_text  # never announced: give the model's text back as text
                else:
                    self._failed_calls.add(event.index)  # announced and streamed already: it stays as sent
            elif hasattr(event, "index"):
                if event.index > 0 and not self._parallel_tool_calls:
                    continue
                self._announced_calls.add(event.index)
                composed.tool_calls.append(
                    ToolCallPiece(
                        index=event.index,
                        id=event.id or "",
                        name=event.name or "",
                        arguments=event.arguments or "",
                    )
                )
            else:
                composed.text += event.text
        return composed
