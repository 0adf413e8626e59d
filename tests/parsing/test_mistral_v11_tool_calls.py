"""Mistral's newer tool-call form, `[TOOL_CALLS]name[ARGS]{...}`: streaming under every chunking,
detection from chat templates, writing calls back, and the forced-call grammar."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protoserve.server.parsing.events import ParseEvent, TextEvent, ToolCallDelta, ToolCallEnd, ToolCallError
from protoserve.server.parsing.tool_call_formats import write_tool_calls
from protoserve.server.parsing.tool_calls import create_tool_parser, detect_tool_parser, forced_tool_call_grammar

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "ping"}},
]


@dataclass
class Outcome:
    """One run's events joined: text, the announced calls (name, argument text), errors, parsed calls."""

    text: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[int | None, str, str]] = field(default_factory=list)
    parsed: list[tuple[str, str]] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


def run(fmt: str, pieces: list[str]) -> Outcome:
    parser = create_tool_parser(fmt, TOOLS)
    events: list[ParseEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    outcome = Outcome()
    announced: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, TextEvent):
            outcome.text += event.text
        elif isinstance(event, ToolCallDelta) and event.id:
            assert event.index not in announced and event.name and not event.arguments
            announced[event.index] = [event.name, ""]
        elif isinstance(event, ToolCallDelta):
            assert event.index not in outcome.ended
            announced[event.index][1] += event.arguments
        elif isinstance(event, ToolCallEnd):
            outcome.ended.append(event.ended_index)
        elif isinstance(event, ToolCallError):
            outcome.errors.append((event.index, event.raw_text, event.message))
    outcome.calls = [(name, arguments) for name, arguments in announced.values()]
    outcome.parsed = [(call.name, call.arguments) for call in parser.tool_calls]
    assert [announced[index][0] for index in outcome.ended] == [name for name, _ in outcome.parsed]
    return outcome


def run_every_chunking(text: str, fmt: str = "mistral_v11") -> Outcome:
    """Feed `text` split every 1..n characters; all runs must give the same joined events."""
    whole = run(fmt, [text])
    for size in range(1, len(text)):
        chunked = run(fmt, [text[start : start + size] for start in range(0, len(text), size)])
        assert (chunked.text, chunked.calls, chunked.errors, chunked.parsed) == (
            whole.text, whole.calls, whole.errors, whole.parsed
        ), f"chunk size {size}"  # fmt: skip
    return whole


def test_one_call_after_text() -> None:
    outcome = run_every_chunking('Let me look. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris [x] {y}"}')
    assert outcome.text == "Let me look."
    assert outcome.parsed == [("get_weather", '{"city": "Paris [x] {y}"}')]  # as generated
    assert outcome.calls == outcome.parsed and not outcome.errors


def test_several_calls_repeat_the_pattern() -> None:
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2}[TOOL_CALLS]add[ARGS]{"a": [1, {"b": null}]}'
    outcome = run_every_chunking(text + " \n")
    assert [(name, json.loads(arguments)) for name, arguments in outcome.parsed] == [
        ("get_weather", {"city": "Oslo", "days": 2}),
        ("add", {"a": [1, {"b": None}]}),
    ]
    assert outcome.text == "" and not outcome.errors


def test_whitespace_around_names_and_text_after_calls() -> None:
    outcome = run_every_chunking('[TOOL_CALLS] ping [ARGS] {} \n[TOOL_CALLS]add[ARGS]{"x": 1}\nDone.')
    assert outcome.parsed == [("ping", "{}"), ("add", '{"x": 1}')]
    assert outcome.text == "Done."


def test_a_call_id_between_name_and_arguments_is_ignored() -> None:
    outcome = run_every_chunking('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Rome"}')
    assert outcome.parsed == [("get_weather", '{"city": "Rome"}')]


def test_the_name_is_announced_as_soon_as_the_arguments_marker_arrives() -> None:
    parser = create_tool_parser("mistral_v11", TOOLS)
    assert parser.feed("[TOOL_CALLS]get_wea") == []
    [announced] = parser.feed("ther[ARGS]")
    assert isinstance(announced, ToolCallDelta) and announced.name == "get_weather" and announced.id
    assert parser.feed('{"city": "Li') == [ToolCallDelta(index=0, arguments='{"city": "Li')]


def test_unknown_tool_is_an_error_and_the_next_call_still_counts() -> None:
    outcome = run_every_chunking('[TOOL_CALLS]rm_rf[ARGS]{"path": "/"}[TOOL_CALLS]ping[ARGS]{}')
    assert outcome.parsed == [("ping", "{}")]
    [(index, raw, message)] = outcome.errors
    assert index is None and raw == 'rm_rf[ARGS]{"path": "/"}' and "rm_rf" in message


def test_broken_arguments_keep_their_raw_text() -> None:
    outcome = run_every_chunking('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"] and more')
    assert outcome.parsed == []
    [(index, raw, message)] = outcome.errors
    assert index == 0 and "mismatched" in message
    assert raw == 'get_weather[ARGS]{"city": "Paris"] and more'


@pytest.mark.parametrize(
    ("text", "raw", "message"),
    [
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Pa', 'get_weather[ARGS]{"city": "Pa', "ended inside"),
        ("[TOOL_CALLS]get_weather[AR", "get_weather[AR", "ended before [ARGS]"),
        ("[TOOL_CALLS]get_weather", "get_weather", "ended before [ARGS]"),
        ('[TOOL_CALLS]get_weather[ARGS]"Paris"', 'get_weather[ARGS]"Paris"', "must be a JSON object"),
        ('[TOOL_CALLS]get weather[ARGS]{"city": "x"}', 'get weather[ARGS]{"city": "x"}', "a function name"),
        ("[TOOL_CALLS][ARGS]{}", "[ARGS]{}", "a function name"),
        ("[TOOL_CALLS]ping[oops]{}", "ping[oops]{}", "a function name"),
        ("[TOOL_CALLS]" + "x" * 300, "x" * 300, "a function name"),  # no name is that long
    ],
)
def test_bad_calls_are_errors_with_their_raw_text(text: str, raw: str, message: str) -> None:
    outcome = run_every_chunking("Sure. " + text)
    assert outcome.text == "Sure." and outcome.parsed == []
    [(_, error_raw, error_message)] = outcome.errors
    assert error_raw == raw and message in error_message


@pytest.mark.parametrize("fmt", ["mistral", "mistral_v11"])
def test_both_mistral_parsers_read_both_forms(fmt: str) -> None:
    old_form = (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}, {"name": "ping", "arguments": {}}]'
    )
    new_form = '[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}[TOOL_CALLS]ping[ARGS]{}'
    for text in (old_form, new_form):
        outcome = run_every_chunking(text, fmt)
        assert [(name, json.loads(arguments)) for name, arguments in outcome.parsed] == [
            ("get_weather", {"city": "Lima"}),
            ("ping", {}),
        ]
    assert run_every_chunking("[TOOL_CALLS] hello", fmt).errors[0][1] == "hello"


MIXED = (
    'Checking [TOOL_CALLS]get_weather[ARGS]{"city": "a]b}c\\"d"}[TOOL_CALLS]nope[ARGS]{}'
    "[TOOL_CALLS]add[ARGS]{} then text [TOOL_CALLS]ping[AR"
)


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(0, len(MIXED)), max_size=20))
def test_random_chunkings_agree_with_one_piece(cuts: list[int]) -> None:
    ordered = sorted(cuts)
    pieces = [MIXED[start:end] for start, end in zip([0, *ordered], [*ordered, len(MIXED)], strict=True)]
    assert run("mistral_v11", pieces) == run("mistral_v11", [MIXED])


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ '[TOOL_CALLS]' + call.function.name + '[ARGS]' + call.function.arguments|tojson }}", "mistral_v11"),
        ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS][{{ calls }}]", "mistral"),
    ],
)
def test_detection_from_the_chat_template(template: str, expected: str) -> None:
    assert detect_tool_parser(template) == expected


def test_written_calls_parse_back() -> None:
    calls = [("get_weather", {"city": "Köln", "days": 3}), ("ping", {})]
    written = write_tool_calls("mistral_v11", calls)
    assert written == '[TOOL_CALLS]get_weather[ARGS]{"city": "K\\u00f6ln", "days": 3}[TOOL_CALLS]ping[ARGS]{}'
    outcome = run_every_chunking(written)
    assert [(name, json.loads(arguments)) for name, arguments in outcome.parsed] == calls


class _ByteTokenizer:
    """One token per byte plus an end-of-sequence token: every text is exactly tokenizable."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([value]) for value in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))


def accepts(grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(TOKENIZER, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(list(text.encode())) and not matcher.is_error() and matcher.is_accepting()


def test_forced_grammar_accepts_written_calls_and_refuses_others() -> None:
    grammar = forced_tool_call_grammar("mistral_v11", TOOLS, None, allow_parallel=True)
    assert llguidance.LLMatcher.validate_grammar(grammar, TOKENIZER) == ""
    one = write_tool_calls("mistral_v11", [("get_weather", {"city": "Paris", "days": 2})])
    three = write_tool_calls("mistral_v11", [("get_weather", {"city": "Paris"}), ("add", {"x": 1}), ("ping", {})])
    assert accepts(grammar, one) and accepts(grammar, three)
    assert not accepts(grammar, three + write_tool_calls("mistral_v11", [("ping", {})]))  # one per tool at most
    assert not accepts(grammar, '[TOOL_CALLS]get_weather[ARGS]{"town": "Paris"}')  # closed schema
    assert not accepts(grammar, '[TOOL_CALLS]get_weather[ARGS]{"city": 3}')
    assert not accepts(grammar, "[TOOL_CALLS]nope[ARGS]{}")
    assert not accepts(grammar, '[TOOL_CALLS][{"name": "ping", "arguments": {}}]')  # the old form is not this one


def test_forced_grammar_for_a_named_function_allows_exactly_one_call() -> None:
    grammar = forced_tool_call_grammar("mistral_v11", TOOLS, "ping", allow_parallel=True)
    assert accepts(grammar, "[TOOL_CALLS]ping[ARGS]{}")
    assert not accepts(grammar, "[TOOL_CALLS]ping[ARGS]{}[TOOL_CALLS]ping[ARGS]{}")
    assert not accepts(grammar, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    single = forced_tool_call_grammar("mistral_v11", TOOLS, None, allow_parallel=False)
    assert not accepts(single, "[TOOL_CALLS]ping[ARGS]{}[TOOL_CALLS]ping[ARGS]{}")


def test_the_old_mistral_form_is_still_written_and_forced() -> None:
    written = write_tool_calls("mistral", [("ping", {})])
    assert written == '[TOOL_CALLS][{"name": "ping", "arguments": {}}]'
    assert accepts(forced_tool_call_grammar("mistral", TOOLS, "ping"), written)
