"""ChoiceComposer: reasoning split, tool-call pieces, reasoning token counting, parallel_tool_calls."""

from __future__ import annotations

from types import SimpleNamespace

from protoserve.server.chat.composer import ChoiceComposer, ComposedText
from protoserve.server.chat.parsing_hooks import prompt_ends_inside_tags

try:
    from .generation_fakes import HermesParser, ThinkParser
except ImportError:
    from generation_fakes import HermesParser, ThinkParser  # type: ignore[no-redef]

THINK = SimpleNamespace(start="<think>", end="</think>")


def run(composer: ChoiceComposer, pieces: list[str]) -> ComposedText:
    total = ComposedText()
    for piece in pieces:
        total.extend(composer.feed(piece, 1))
    total.extend(composer.finish())
    return total


def test_plain_composer_passes_text_through() -> None:
    composer = ChoiceComposer()
    assert run(composer, ["a", "b", ""]).text == "ab"
    assert not composer.called_tools and composer.reasoning_tokens == 0


def test_reasoning_is_split_and_counted() -> None:
    composer = ChoiceComposer(reasoning_parser=ThinkParser(THINK, False))
    total = run(composer, ["<th", "ink>", "plan", " more", "</thi", "nk>", "Answer", "."])
    assert total.reasoning == "plan more" and total.text == "Answer."
    # "plan" and " more" gave reasoning only; "</thi" and "nk>" gave nothing while inside reasoning.
    assert composer.reasoning_tokens == 4


def test_reasoning_that_starts_inside_the_prompt() -> None:
    composer = ChoiceComposer(reasoning_parser=ThinkParser(THINK, True))
    total = run(composer, ["hmm", "</think>", "ok"])
    assert (total.reasoning, total.text) == ("hmm", "ok")


def test_unfinished_reasoning_is_released_at_finish() -> None:
    composer = ChoiceComposer(reasoning_parser=ThinkParser(THINK, True))
    assert run(composer, ["still", " thinking </th"]).reasoning == "still thinking </th"


def test_tool_calls_become_pieces_and_text_stays_text() -> None:
    composer = ChoiceComposer(reasoning_parser=ThinkParser(THINK, False), tool_parser=HermesParser())
    pieces = [
        "<think>need weather</think>",
        "Let me check. <tool",
        '_call>{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}',
        "</tool_call>",
    ]
    total = run(composer, pieces)
    assert total.reasoning == "need weather" and total.text == "Let me check. "
    assert composer.called_tools
    first, second = total.tool_calls
    assert (first.index, first.id, first.name, first.arguments) == (0, "call_0", "get_weather", "")
    assert (second.index, second.id, second.name, second.arguments) == (0, "", "", '{"city": "Paris"}')


def test_only_the_first_call_is_kept_without_parallel_tool_calls() -> None:
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    parallel = run(ChoiceComposer(tool_parser=HermesParser()), [call, call])
    assert {piece.index for piece in parallel.tool_calls} == {0, 1}
    single = run(ChoiceComposer(tool_parser=HermesParser(), parallel_tool_calls=False), [call, call])
    assert {piece.index for piece in single.tool_calls} == {0}


def test_text_held_back_by_the_tool_parser_is_released_at_finish() -> None:
    composer = ChoiceComposer(tool_parser=HermesParser())
    first = composer.feed("Hi <tool", 2)
    assert first.text == "Hi "
    assert composer.finish().text == "<tool" and not composer.called_tools


def test_prompt_ends_inside_tags() -> None:
    assert prompt_ends_inside_tags("<think>", "</think>", "assistant\n<think>\n")
    assert not prompt_ends_inside_tags("<think>", "</think>", "assistant\n<think>\n\n</think>\n\n")
    assert not prompt_ends_inside_tags("<think>", "</think>", "assistant\n")
    assert not prompt_ends_inside_tags(None, None, "<think>")


class ScriptedToolParser:
    """Plays back fixed events, to check how the composer treats each kind."""

    def __init__(self, events: list[object]) -> None:
        self._events = events

    def feed(self, text: str) -> list[object]:
        events, self._events = self._events, []
        return events

    def finish(self) -> list[object]:
        return []


def test_refused_calls() -> None:
    from protoserve.server.parsing.events import TextEvent, ToolCallDelta, ToolCallError

    never_announced = ChoiceComposer(
        tool_parser=ScriptedToolParser(
            [TextEvent("a"), ToolCallError(None, "<tool_call>{bad}</tool_call>", "bad JSON")]
        )
    )
    composed = never_announced.feed("x", 1)
    assert composed.text == "a<tool_call>{bad}</tool_call>" and not never_announced.called_tools

    announced = ChoiceComposer(
        tool_parser=ScriptedToolParser(
            [
                ToolCallDelta(0, "call_a", "f", ""),
                ToolCallDelta(0, "", "", '{"x": '),
                ToolCallError(0, '{"name": "f", "arguments": {"x": ', "cut off"),
            ]
        )
    )
    composed = announced.feed("x", 1)
    # Its pieces were held, never passed on: the cut-off call comes back as text, not as a broken call.
    assert composed.tool_calls == [] and composed.text == '{"name": "f", "arguments": {"x": '
    assert not announced.called_tools and announced.finish().tool_calls == []


def test_a_call_is_passed_on_when_it_ends_and_later_refused_calls_do_not_leave_gaps() -> None:
    from protoserve.server.parsing.events import ToolCallDelta, ToolCallEnd, ToolCallError

    class Stepwise:
        def __init__(self, steps: list[list[object]]) -> None:
            self._steps = steps

        def feed(self, text: str) -> list[object]:
            return self._steps.pop(0)

        def finish(self) -> list[object]:
            return self._steps.pop(0) if self._steps else []

    composer = ChoiceComposer(
        tool_parser=Stepwise(
            [
                [ToolCallDelta(0, "call_a", "f", ""), ToolCallDelta(0, "", "", '{"x": 1')],
                [ToolCallDelta(0, "", "", "}"), ToolCallEnd(0), ToolCallDelta(1, "call_b", "f", "")],
                [ToolCallError(1, "{broken", "bad JSON"), ToolCallDelta(2, "call_c", "g", '{"y": 2}')],
                [ToolCallEnd(2), ToolCallDelta(3, "call_d", "f", ""), ToolCallDelta(3, "", "", '{"x": ')],
                [ToolCallError(3, '{"name": "f", "arguments": {"x": ', "the output ended inside a tool call")],
            ]
        )
    )
    assert composer.feed("a", 1).tool_calls == []  # held until the call ends
    second = composer.feed("b", 1)
    assert [(piece.index, piece.id, piece.arguments) for piece in second.tool_calls] == [
        (0, "call_a", ""),
        (0, "", '{"x": 1'),
        (0, "", "}"),
    ]
    third = composer.feed("c", 1)
    assert third.text == "{broken" and third.tool_calls == []
    fourth = composer.feed("d", 1)
    assert [(piece.index, piece.id) for piece in fourth.tool_calls] == [(1, "call_c")]  # renumbered, no gap
    last = composer.finish()
    assert last.tool_calls == [] and last.text == '{"name": "f", "arguments": {"x": '
    assert composer.called_tools
