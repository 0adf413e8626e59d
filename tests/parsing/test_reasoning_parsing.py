"""Reasoning split: <think> tags held back across deltas, under every chunking."""

from __future__ import annotations

import pytest
from protoserve.server.parsing.reasoning import ReasoningFormat, ReasoningStreamParser, detect_reasoning


def split(text: str, chunk_size: int, starts_inside: bool) -> tuple[str, str]:
    parser = ReasoningStreamParser(ReasoningFormat(), starts_inside)
    reasoning, content = "", ""
    for start in range(0, len(text), chunk_size):
        delta_reasoning, delta_content = parser.feed(text[start : start + chunk_size])
        reasoning, content = reasoning + delta_reasoning, content + delta_content
    last_reasoning, last_content = parser.flush()
    return reasoning + last_reasoning, content + last_content


def split_every_way(text: str, starts_inside: bool = False) -> tuple[str, str]:
    results = {split(text, size, starts_inside) for size in range(1, len(text) + 1)}
    assert len(results) == 1, results
    return results.pop()


@pytest.mark.parametrize(
    ("text", "starts_inside", "expected"),
    [
        ("<think>\nLet me add: 2+2.\n</think>\n\nIt is 4.", False, ("Let me add: 2+2.\n", "It is 4.")),
        ("  <think>hmm</think>ok", False, ("hmm", "ok")),
        ("Let me see, 2+2.</think>\n\nIt is 4.", True, ("Let me see, 2+2.", "It is 4.")),
        ("Plain answer with <think> inside.", False, ("", "Plain answer with <think> inside.")),
        ("<think>never closed", False, ("never closed", "")),
        ("still thinking <thi", True, ("still thinking <thi", "")),
        ("a</think>b</think>c", True, ("a", "b</think>c")),
        ("<thin", False, ("", "<thin")),
        ("", False, ("", "")),
        ("\n\nJust text.", False, ("", "\n\nJust text.")),
    ],
)
def test_reasoning_and_content_split(text: str, starts_inside: bool, expected: tuple[str, str]) -> None:
    if text:
        assert split_every_way(text, starts_inside) == expected
    else:
        assert split(text, 1, starts_inside) == expected


def test_partial_tags_are_held_back_then_released() -> None:
    parser = ReasoningStreamParser(ReasoningFormat(), starts_inside=True)
    assert parser.feed("thinking </thi") == ("thinking ", "")
    assert parser.feed("nk>Answer") == ("", "Answer")
    assert parser.flush() == ("", "")


def test_custom_tags() -> None:
    fmt = ReasoningFormat(start="<reasoning>", end="</reasoning>")
    parser = ReasoningStreamParser(fmt, starts_inside=False)
    assert parser.feed("<reasoning>x</reasoning>y") == ("x", "y")


class _Tokenizer:
    def __init__(self, vocabulary: dict[str, int]) -> None:
        self._vocabulary = vocabulary
        self.vocabularies_built = 0

    def get_vocab(self) -> dict[str, int]:
        self.vocabularies_built += 1
        return dict(self._vocabulary)


def test_detect_reasoning() -> None:
    assert detect_reasoning("{{ '<think>\\n' }}", None) == ReasoningFormat()
    assert detect_reasoning(None, _Tokenizer({"<think>": 5, "</think>": 6})) == ReasoningFormat()
    assert detect_reasoning("{{ messages }}", _Tokenizer({"<think>": 5})) is None
    assert detect_reasoning(None, object()) is None


def test_each_tokenizer_vocabulary_is_read_once() -> None:
    """The check runs for every request; a vocabulary dict is built once per tokenizer."""
    with_tags, without = _Tokenizer({"<think>": 5, "</think>": 6}), _Tokenizer({"a": 1})
    for _ in range(3):
        assert detect_reasoning(None, with_tags) == ReasoningFormat()
        assert detect_reasoning("{{ messages }}", without) is None
    assert (with_tags.vocabularies_built, without.vocabularies_built) == (1, 1)
