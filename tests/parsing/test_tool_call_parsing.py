"""Streaming tool-call parsing for the hermes, llama3 and mistral formats, under every chunking."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protoserve.server.parsing.events import ParseEvent, TextEvent, ToolCallDelta, ToolCallEnd
from protoserve.server.parsing.tool_calls import ToolCallStreamParser, create_tool_parser, detect_tool_parser

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
]


@dataclass
class Joined:
    """Events of one run, joined: the text, each announced call, each error."""

    text: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    errors: list[tuple[int | None, str, str]] = field(default_factory=list)
    parsed: list[tuple[str, str]] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


def join(events: list[ParseEvent], parser: ToolCallStreamParser) -> Joined:
    joined = Joined()
    for event in events:
        if isinstance(event, TextEvent):
            assert event.text
            joined.text += event.text
        elif isinstance(event, ToolCallDelta):
            if event.id:
                assert event.index not in joined.calls and event.id.startswith("call_") and event.name
                assert event.arguments == ""
                joined.calls[event.index] = {"id": event.id, "name": event.name, "arguments": ""}
            else:
                assert event.index in joined.calls and not event.name
                assert event.index not in joined.ended, "a delta after its call ended"
                joined.calls[event.index]["arguments"] += event.arguments
        elif isinstance(event, ToolCallEnd):
            assert event.ended_index in joined.calls and event.ended_index not in joined.ended
            joined.ended.append(event.ended_index)
        else:
            joined.errors.append((event.index, event.raw_text, event.message))
    joined.parsed = [(call.name, call.arguments) for call in parser.tool_calls]
    for call in parser.tool_calls:
        assert any(announced["id"] == call.id for announced in joined.calls.values())
    # Exactly the valid calls end, and no call that ended is reported as an error.
    assert [joined.calls[index]["id"] for index in joined.ended] == [call.id for call in parser.tool_calls]
    assert not {index for index, _, _ in joined.errors} & set(joined.ended)
    return joined


def run(fmt: str, text: str, chunk_size: int) -> Joined:
    parser = create_tool_parser(fmt, TOOLS)
    events: list[ParseEvent] = []
    for start in range(0, len(text), chunk_size):
        events += parser.feed(text[start : start + chunk_size])
    events += parser.finish()
    assert parser.finish() == []
    return join(events, parser)


def run_every_chunking(fmt: str, text: str) -> Joined:
    """Feed `text` split every 1..n characters; all runs must agree (ids aside)."""
    runs = [run(fmt, text, size) for size in range(1, len(text) + 1)]
    first = runs[0]
    for other in runs[1:]:
        assert other.text == first.text
        assert [(c["name"], c["arguments"]) for c in other.calls.values()] == [
            (c["name"], c["arguments"]) for c in first.calls.values()
        ]
        assert other.errors == first.errors
        assert other.parsed == first.parsed
    return first


def call_arguments(joined: Joined) -> list[tuple[str, Any]]:
    return [(call["name"], json.loads(call["arguments"])) for call in joined.calls.values()]


HERMES_TWO_CALLS = (
    "Let me check both.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris <3 \\"x\\" }"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": [1, 2.5e3, true, null]}}\n</tool_call>'
)


def test_hermes_text_then_two_calls() -> None:
    joined = run_every_chunking("hermes", HERMES_TWO_CALLS)
    assert joined.text == "Let me check both."
    assert call_arguments(joined) == [
        ("get_weather", {"city": 'Paris <3 "x" }'}),
        ("add", {"a": [1, 2500.0, True, None]}),
    ]
    assert joined.parsed == [(c["name"], c["arguments"]) for c in joined.calls.values()]
    assert joined.calls[0]["arguments"] == '{"city": "Paris <3 \\"x\\" }"}'  # as generated
    assert not joined.errors


def test_plain_text_streams_immediately_and_keeps_angle_brackets() -> None:
    parser = create_tool_parser("hermes", TOOLS)
    assert parser.feed("a < b and ") == [TextEvent("a < b and")]
    assert parser.feed("<tool") == []  # the space waits with the ambiguous "<tool"
    assert parser.feed("box> is text") == [TextEvent(" <toolbox> is text")]
    assert parser.finish() == []
    assert run_every_chunking("hermes", "x <tool_cal y\n").text == "x <tool_cal y\n"


def test_hermes_malformed_json_is_reported_and_text_continues() -> None:
    text = 'Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"]}\n</tool_call> bye'
    joined = run_every_chunking("hermes", text)
    assert joined.text == "Hi bye"
    assert joined.parsed == []
    [(index, raw, message)] = joined.errors
    assert index == 0  # announced, then broken: the caller discards call 0
    assert raw.startswith('{"name": "get_weather"') and "mismatched" in message


def test_unknown_tool_name_is_an_error_and_never_announced() -> None:
    joined = run_every_chunking("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {"path": "/"}}\n</tool_call>')
    assert joined.calls == {} and joined.parsed == []
    [(index, raw, message)] = joined.errors
    assert index is None and "rm_rf" in message and "get_weather" in message
    assert json.loads(raw)["name"] == "rm_rf"


def test_call_cut_off_by_the_end_of_output() -> None:
    joined = run_every_chunking("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    [(index, raw, message)] = joined.errors
    assert index == 0 and "ended inside" in message and raw.endswith('{"ci')


def test_marker_without_a_call_and_missing_closing_tag() -> None:
    joined = run_every_chunking("hermes", "Sure.<tool_call>\n")
    assert joined.text == "Sure." and "without a tool call" in joined.errors[0][2]
    unclosed = run_every_chunking("hermes", '<tool_call>{"name": "add", "arguments": {}}\n</tool')
    assert unclosed.parsed == [("add", "{}")] and not unclosed.errors


def test_garbage_after_a_call_before_the_closing_tag() -> None:
    joined = run_every_chunking("hermes", '<tool_call>{"name": "add", "arguments": {}} oops</tool_call>ok')
    assert joined.parsed == [("add", "{}")]
    assert joined.errors == [(None, "oops", "unexpected text after a tool call, before </tool_call>")]
    assert joined.text == "ok"


def test_arguments_before_name_and_arguments_as_string() -> None:
    joined = run_every_chunking(
        "hermes",
        '<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>',
    )
    assert joined.parsed == [("get_weather", '{"city": "Oslo"}'), ("add", '{"a":1}')]
    assert call_arguments(joined) == [("get_weather", {"city": "Oslo"}), ("add", {"a": 1})]


def test_llama3_calls_at_output_start_separated_by_semicolons() -> None:
    text = (
        '{"name": "get_weather", "parameters": {"city": "Rome"}}; {"type": "function", "name": "add", "parameters": {}}'
    )
    joined = run_every_chunking("llama3", text)
    assert joined.text == ""
    assert call_arguments(joined) == [("get_weather", {"city": "Rome"}), ("add", {})]


def test_llama3_python_tag_after_text() -> None:
    joined = run_every_chunking("llama3", 'Checking. <|python_tag|>{"name": "add", "parameters": {"x": 2}}')
    assert joined.text == "Checking."
    assert call_arguments(joined) == [("add", {"x": 2})]


def test_llama3_json_that_is_not_a_call_is_text() -> None:
    text = '{"answer": 42}'
    joined = run_every_chunking("llama3", text)
    assert joined.text == text and not joined.calls and not joined.errors
    assert run_every_chunking("llama3", "  The weather is fine.").text == "  The weather is fine."


def test_llama3_broken_call_runs_to_the_end() -> None:
    joined = run_every_chunking("llama3", '{"name": "add", "parameters": {"x": 1}; nonsense')
    [(index, raw, message)] = joined.errors
    assert index == 0 and raw.endswith("nonsense")


def test_mistral_list_of_calls() -> None:
    text = (
        'Sure [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}, {"name": "add", "arguments": {}}]'
    )
    joined = run_every_chunking("mistral", text)
    assert joined.text == "Sure"
    assert call_arguments(joined) == [("get_weather", {"city": "Lima"}), ("add", {})]


def test_mistral_unknown_name_in_the_list_keeps_the_valid_call() -> None:
    text = '[TOOL_CALLS][{"name": "nope", "arguments": {}}, {"name": "add", "arguments": {"y": 1}}]'
    joined = run_every_chunking("mistral", text)
    assert call_arguments(joined) == [("add", {"y": 1})]
    assert len(joined.errors) == 1 and "nope" in joined.errors[0][2]


def test_mistral_marker_then_not_json() -> None:
    joined = run_every_chunking("mistral", "[TOOL_CALLS] hello")
    assert joined.errors and joined.errors[0][1] == "hello" and not joined.calls


def test_text_only_output_keeps_its_whitespace() -> None:
    text = "Line one.\n\n  Line two.  \n"
    for fmt in ("hermes", "llama3", "mistral"):
        assert run_every_chunking(fmt, text).text == text


def test_unknown_parser_name() -> None:
    with pytest.raises(ValueError, match="hermes, llama3, mistral"):
        create_tool_parser("xml", TOOLS)


def test_feed_after_finish_is_a_programming_error() -> None:
    parser = create_tool_parser("hermes", TOOLS)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for tool in tools %}<tool_call>{{ tool }}</tool_call>{% endfor %}", "hermes"),
        ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS] [TOOL_CALLS]", "mistral"),
        ("<|start_header_id|>ipython<|end_header_id|> <|python_tag|>", "llama3"),
        ('<|start_header_id|>user<|end_header_id|> {"name": function name, "parameters": ...}', "llama3"),
        ("{{ messages }}", None),
        (None, None),
    ],
)
def test_detect_tool_parser(template: str | None, expected: str | None) -> None:
    assert detect_tool_parser(template) == expected


MIXED_OUTPUTS = {
    "hermes": HERMES_TWO_CALLS + ' and then <tool_call>{"name": "x", "arguments": {}}</tool_call> <tool_ca',
    "llama3": '{"name": "add", "parameters": {"q": "a;b"}};{"name": "get_weather", "parameters": "{}"} trailing',
    "mistral": 'a [TOOL_CALLS] [{"name": "add", "arguments": {"k": "]"}}, {"name": "add", "arguments": {}}] tail',
}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("fmt", sorted(MIXED_OUTPUTS))
def test_random_chunkings_agree_with_one_piece(fmt: str, data: st.DataObject) -> None:
    text = MIXED_OUTPUTS[fmt]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=15)))
    pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    parser = create_tool_parser(fmt, TOOLS)
    events: list[ParseEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    chunked = join(events, parser)
    whole = run(fmt, text, len(text))
    assert (chunked.text, chunked.errors, chunked.parsed) == (whole.text, whole.errors, whole.parsed)
    assert [(c["name"], c["arguments"]) for c in chunked.calls.values()] == [
        (c["name"], c["arguments"]) for c in whole.calls.values()
    ]


def run_chunkings(fmt: str, text: str, sizes: tuple[int, ...] = (1, 2, 3, 7)) -> Joined:
    """Like `run_every_chunking` for text too long to split every way: a few sizes and one piece."""
    runs = [run(fmt, text, size) for size in (*sizes, len(text))]
    first = runs[0]
    for other in runs[1:]:
        assert (other.text, other.errors, other.parsed) == (first.text, first.errors, first.parsed)
        assert [(c["name"], c["arguments"]) for c in other.calls.values()] == [
            (c["name"], c["arguments"]) for c in first.calls.values()
        ]
    return first


@pytest.mark.parametrize(
    ("call", "index"),
    [
        ('{"na\nme": "get_weather"}', None),  # a raw control character in a key
        ('{"\\q": 1}', None),  # a bad escape
        ('{"name": "get_weather", "argu\tments": {}}', 0),  # after the call was announced
        ('{"name": "add", "\\u12x": 1}', 0),
    ],
)
def test_key_that_is_not_a_json_string_is_a_refused_call(call: str, index: int | None) -> None:
    joined = run_every_chunking("hermes", f"Sure. <tool_call>{call}</tool_call> ok")
    assert joined.parsed == [] and joined.text == "Sure. ok"
    [(error_index, raw, message)] = joined.errors
    assert error_index == index and raw == call and "not a valid JSON string" in message


@pytest.mark.parametrize(
    ("call", "repeated"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}, "arguments": {"city": "Paris"}}', "arguments key"),
        ('{"name": "add", "arguments": {"a": 1}, "parameters": {"b": 22}}', "arguments key"),
        ('{"parameters": "{}", "name": "add", "arguments": {"b": 2}}', "arguments key"),
        ('{"name": "add", "name": "get_weather", "arguments": {"city": "Oslo"}}', '"name" key'),
        ('{"name": 1, "arguments": {}, "n\\u0061me": "add"}', '"name" key'),
    ],
)
def test_repeated_name_or_arguments_key_is_a_refused_call(call: str, repeated: str) -> None:
    """json.loads keeps the last one, the stream had announced the first: the call is refused."""
    joined = run_every_chunking("hermes", f"<tool_call>{call}</tool_call>")
    assert joined.parsed == [] and not joined.ended
    [(_, raw, message)] = joined.errors
    assert raw.startswith(call[:12]) and f"more than one {repeated}" in message
    for announced in joined.calls.values():  # what streamed before the refusal is the first value, as written
        assert announced["arguments"] in call


@pytest.mark.parametrize(
    "call",
    [
        json.dumps({"name": "add", "arguments": '{"x": NaN}'}),
        json.dumps({"name": "add", "arguments": '{"x": [1e999]}'}),
        json.dumps({"name": "add", "arguments": '{"x": -Infinity}'}),
        '{"name": "add", "arguments": {"x": 1e999}}',  # the object form: JSON's grammar, a float's range
        '{"name": "add", "arguments": {"x": {"y": -1E400}}}',
        '{"name": "add", "parameters": {"x": 1}, "type": 2e308}',
    ],
)
def test_numbers_json_cannot_carry_make_the_call_invalid(call: str) -> None:
    """NaN, Infinity and numbers beyond a float's range would come back as NaN/Infinity, not JSON."""
    joined = run_every_chunking("hermes", f"<tool_call>{call}</tool_call>")
    assert joined.parsed == []
    [(_, raw, message)] = joined.errors
    assert raw == call and "not finite" in message


def test_mistral_v11_arguments_beyond_a_floats_range_make_the_call_invalid() -> None:
    joined = run_every_chunking("mistral_v11", '[TOOL_CALLS]add[ARGS]{"x": 1e999}')
    assert joined.parsed == [] and "not finite" in joined.errors[0][2]


def test_finite_numbers_in_arguments_strings_still_parse() -> None:
    call = json.dumps({"name": "add", "arguments": '{"x": 1.5e3, "y": -0.0, "z": 1e-999}'})
    joined = run_every_chunking("hermes", f"<tool_call>{call}</tool_call>")
    assert joined.parsed == [("add", '{"x":1500.0,"y":-0.0,"z":0.0}')] and not joined.errors


def test_integer_too_long_for_python_makes_the_call_invalid() -> None:
    call = '{"name": "add", "arguments": {"x": ' + "7" * 5000 + "}}"
    joined = run_chunkings("hermes", f"<tool_call>{call}</tool_call>", sizes=(1, 999))
    assert joined.parsed == [] and "too long" in joined.errors[0][2]


DEEP = 3000  # beyond json.loads' recursion limit


@pytest.mark.parametrize(
    "call",
    [
        '{"name": "add", "arguments": {"a": ' + "[" * DEEP + "]" * DEEP + "}}",
        json.dumps({"name": "add", "arguments": '{"a": ' + "[" * DEEP + "]" * DEEP + "}"}),
        '{"name": ' + "[" * DEEP + "]" * DEEP + ', "arguments": {}}',  # read while the call streams
    ],
)
def test_nesting_too_deep_to_parse_makes_the_call_invalid(call: str) -> None:
    joined = run_chunkings("hermes", f"<tool_call>{call}</tool_call> done", sizes=(1, 999))
    assert joined.parsed == [] and joined.text == " done"
    [(_, raw, message)] = joined.errors
    assert raw == call and "nested too deeply" in message
