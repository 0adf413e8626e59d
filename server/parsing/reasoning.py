"""Separate a reasoning model's thinking (`<think>...</think>`) from its answer, while streaming.

Rules: the start tag counts only at the very beginning of the output (leading whitespace allowed),
or not at all when `starts_inside` (the prompt already ends with it, as Qwen3 templates do). The
first end tag closes the reasoning; everything after it is answer text, tags included. Whitespace
right after either tag is dropped. A partial tag at the end of a delta is held back until the next
delta or `flush()`. Output that never closes its reasoning is all reasoning.
"""

from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReasoningFormat:
    """The tags around reasoning text."""

    start: str = "<think>"
    end: str = "</think>"


def detect_reasoning(chat_template: str | None, tokenizer: Any) -> ReasoningFormat | None:
    """A ReasoningFormat when the template mentions <think> or the tokenizer has both tags as tokens."""
    fmt = ReasoningFormat()
    if chat_template and fmt.start in chat_template:
        return fmt
    return fmt if _has_tokens(tokenizer, (fmt.start, fmt.end)) else None


# Per tokenizer and tag set: whether its vocabulary holds all the tags. The check runs for every
# request on the event loop, and `get_vocab()` builds a fresh dict of the whole vocabulary (~20 ms
# for 49k tokens), so each answer is kept for as long as the tokenizer lives.
_tokens_in_vocabulary: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], bool]] = weakref.WeakKeyDictionary()


def _has_tokens(tokenizer: Any, tokens: tuple[str, ...]) -> bool:
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return False
    try:
        answers = _tokens_in_vocabulary.setdefault(tokenizer, {})
    except TypeError:  # not weakly referenceable: no memory of earlier answers
        answers = {}
    if tokens not in answers:
        vocabulary = tokenizer.get_vocab()
        answers[tokens] = all(token in vocabulary for token in tokens)
    return answers[tokens]


class _Phase(enum.Enum):
    BEFORE = "before"  # nothing but whitespace seen: a start tag may still come
    REASONING = "reasoning"
    CONTENT = "content"


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class ReasoningStreamParser:
    """Splits one choice's streamed output into (reasoning delta, content delta) pairs."""

    def __init__(self, fmt: ReasoningFormat, starts_inside: bool) -> None:
        self.format = fmt
        self._phase = _Phase.REASONING if starts_inside else _Phase.BEFORE
        self._pending = ""
        self._drop_space = starts_inside

    def feed(self, text: str) -> tuple[str, str]:
        """Consume a delta; return the reasoning and content text it completes."""
        self._pending += text
        return self._advance(final=False)

    def flush(self) -> tuple[str, str]:
        """The output ended: release anything held back."""
        return self._advance(final=True)

    def _take(self, text: str) -> str:
        if self._drop_space:
            text = text.lstrip()
            if text:
                self._drop_space = False
        return text

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning, content = "", ""
        while self._pending:
            if self._phase is _Phase.BEFORE:
                stripped = self._pending.lstrip()
                if stripped.startswith(self.format.start):
                    self._pending = stripped[len(self.format.start) :]
                    self._phase, self._drop_space = _Phase.REASONING, True
                    continue
                if not final and self.format.start.startswith(stripped):
                    break  # whitespace or a partial start tag: wait
                self._phase = _Phase.CONTENT
                continue
            if self._phase is _Phase.CONTENT:
                content += self._take(self._pending)
                self._pending = ""
                break
            position = self._pending.find(self.format.end)
            if position >= 0:
                reasoning += self._take(self._pending[:position])
                self._pending = self._pending[position + len(self.format.end) :]
                self._phase, self._drop_space = _Phase.CONTENT, True
                continue
            keep = 0 if final else _partial_tag_length(self._pending, self.format.end)
            reasoning += self._take(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            break
        return reasoning, content
