"""Stop strings over streamed text pieces: held back, released, matched, whatever the split."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.engine.stop_strings import StopStringMatcher


def run(stops: Sequence[str], pieces: Sequence[str]) -> tuple[str, str | None, list[str]]:
    """Feed the pieces; return the released text (plus the flush when nothing matched), the match,
    and what was released after each piece."""
    matcher = StopStringMatcher(stops)
    released: list[str] = []
    matched: str | None = None
    for piece in pieces:
        safe, matched = matcher.feed(piece)
        released.append(safe)
        if matched is not None:
            break
    if matched is None:
        released.append(matcher.flush())
    return "".join(released), matched, released


def test_stop_across_pieces_releases_the_text_before_it() -> None:
    text, matched, released = run(["STOP"], ["Hello S", "T", "OP and more"])
    assert (text, matched) == ("Hello ", "STOP")
    assert released[:2] == ["Hello ", ""]  # "S" and "ST" were held back


def test_held_text_is_released_when_it_cannot_be_a_stop_any_more() -> None:
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("a #") == ("a ", None)
    assert matcher.feed("#") == ("", None)
    assert matcher.feed("x") == ("##x", None)


def test_stop_at_the_very_start() -> None:
    assert run(["<end>"], ["<end>tail"])[:2] == ("", "<end>")
    assert run(["<end>"], ["<", "en", "d>"])[:2] == ("", "<end>")


def test_stop_in_the_middle_of_a_piece() -> None:
    assert run(["\n\n"], ["line one\n\nline two"])[:2] == ("line one", "\n\n")


def test_held_text_released_at_the_end() -> None:
    text, matched, released = run(["STOP"], ["finished ST"])
    assert matched is None
    assert released == ["finished ", "ST"]
    assert text == "finished ST"


def test_overlapping_stops_the_one_ending_first_wins() -> None:
    assert run(["abcd", "bc"], ["abcd"])[:2] == ("a", "bc")
    assert run(["abcd", "bc"], ["a", "b", "c", "d"])[:2] == ("a", "bc")
    # Same end: the longer (earlier starting) one wins, whatever the order given.
    assert run(["c", "abc"], ["xabc"])[:2] == ("x", "abc")
    assert run(["abc", "c"], ["xa", "bc"])[:2] == ("x", "abc")


def test_a_stop_that_is_a_prefix_of_another() -> None:
    assert run(["ab", "abc"], ["xab"])[:2] == ("x", "ab")


def test_repeated_characters_do_not_confuse_the_hold() -> None:
    assert run(["aab"], ["a", "a", "a", "b"])[:2] == ("a", "aab")


def test_no_stops_releases_everything_at_once() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_after_a_match_further_text_is_ignored() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb") == ("a", "x")
    assert matcher.feed("more") == ("", None)
    assert matcher.flush() == ""
    assert matcher.matched == "x"


@pytest.mark.parametrize("bad", [[""], ["ok", ""], [None], [3]])
def test_bad_stop_strings_are_rejected(bad: list[object]) -> None:
    with pytest.raises(InvalidRequestError, match="stop strings"):
        StopStringMatcher(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(40))
def test_any_split_gives_the_same_result_as_the_whole_text(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab#\n😀"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice(alphabet) for _ in range(30))
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 10)))
    pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    whole = run(stops, [text])[:2]
    assert run(stops, pieces)[:2] == whole
    assert run(stops, list(text))[:2] == whole
    released, matched = whole
    if matched is None:
        assert released == text
    else:
        assert text.startswith(released + matched)
        assert all(stop not in released for stop in stops)
