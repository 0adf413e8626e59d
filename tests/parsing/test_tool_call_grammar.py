"""Forced tool-call grammars compile with llguidance, accept valid calls and refuse invalid ones,
close open object schemas and bound the number of calls."""

from __future__ import annotations

import copy
import json
from typing import Any

import llguidance
import pytest
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.parsing.tool_call_formats import write_tool_calls
from protoserve.server.parsing.tool_call_grammar import closed_schema, max_forced_calls
from protoserve.server.parsing.tool_calls import create_tool_parser, forced_tool_call_grammar

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]


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


VALID = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
}


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_grammar_compiles_and_accepts_a_valid_call(fmt: str) -> None:
    grammar = forced_tool_call_grammar(fmt, TOOLS, None)
    assert llguidance.LLMatcher.validate_grammar(grammar, TOKENIZER) == ""
    assert accepts(grammar, VALID[fmt])


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_grammar_output_parses_back_into_the_call(fmt: str) -> None:
    parser = create_tool_parser(fmt, TOOLS)
    events = parser.feed(VALID[fmt]) + parser.finish()
    assert [call.name for call in parser.tool_calls] == ["get_weather"], events


@pytest.mark.parametrize(
    "bad_call",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>',  # extra key
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": 3}}\n</tool_call>',  # wrong type
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "x", "days": 0}}\n</tool_call>',  # minimum
        '<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>',  # unknown tool
        "Sure, here is the weather.",  # no call at all
    ],
)
def test_grammar_refuses_invalid_calls(bad_call: str) -> None:
    assert not accepts(forced_tool_call_grammar("hermes", TOOLS, None), bad_call)


def test_whitespace_is_fixed_so_a_model_cannot_stall_on_spaces() -> None:
    grammar = forced_tool_call_grammar("hermes", TOOLS, "ping")
    assert accepts(grammar, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')
    assert not accepts(grammar, '<tool_call>\n{"name":   "ping",  "arguments": {}}\n</tool_call>')
    assert not accepts(grammar, '<tool_call>\n{\n"name": "ping", "arguments": {}}\n</tool_call>')


def test_named_function_is_the_only_one_allowed() -> None:
    grammar = forced_tool_call_grammar("hermes", TOOLS, "ping")
    assert accepts(grammar, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')
    assert not accepts(grammar, VALID["hermes"])


def test_parallel_calls_only_when_allowed() -> None:
    two = VALID["hermes"] + '\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    assert not accepts(forced_tool_call_grammar("hermes", TOOLS, None), two)
    assert accepts(forced_tool_call_grammar("hermes", TOOLS, None, allow_parallel=True), two)
    llama_two = VALID["llama3"] + ';{"name": "ping", "parameters": {}}'
    assert accepts(forced_tool_call_grammar("llama3", TOOLS, None, allow_parallel=True), llama_two)
    mistral_two = '[TOOL_CALLS][{"name": "ping", "arguments": {}},{"name": "ping", "arguments": {}}]'
    assert accepts(forced_tool_call_grammar("mistral", TOOLS, None, allow_parallel=True), mistral_two)


def test_bad_requests_are_clear_errors() -> None:
    with pytest.raises(InvalidRequestError, match="'nope'"):
        forced_tool_call_grammar("hermes", TOOLS, "nope")
    with pytest.raises(InvalidRequestError, match="no tools"):
        forced_tool_call_grammar("hermes", [], None)
    with pytest.raises(InvalidRequestError, match="each tool"):
        forced_tool_call_grammar("hermes", [{"type": "function"}], None)
    with pytest.raises(InvalidRequestError, match="JSON schema object"):
        forced_tool_call_grammar("hermes", [{"type": "function", "function": {"name": "f", "parameters": 3}}], None)
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        forced_tool_call_grammar("xml", TOOLS, None)


def test_unenforceable_schema_is_an_invalid_request() -> None:
    weird = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$ref": "#/nowhere"}}}]
    with pytest.raises(InvalidRequestError, match="cannot be enforced"):
        forced_tool_call_grammar("hermes", weird, None)


OPEN_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer"},
                    "point": {"type": "object", "properties": {"x": {"type": "integer"}}},
                    "tags": {"type": "array", "items": {"type": "object", "properties": {"t": {"type": "string"}}}},
                    "free": {"type": "object"},
                    "extra_ok": {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}},
                },
            },
        },
    }
]


def add_call(arguments: str) -> str:
    return '<tool_call>\n{"name": "add", "arguments": ' + arguments + "}\n</tool_call>"


def test_open_object_schemas_are_closed_at_every_depth_without_touching_the_callers_schema() -> None:
    before = copy.deepcopy(OPEN_TOOLS)
    grammar = forced_tool_call_grammar("hermes", OPEN_TOOLS, "add")
    assert OPEN_TOOLS == before
    assert accepts(grammar, add_call('{"a": 1, "point": {"x": 2}, "tags": [{"t": "x"}]}'))
    assert not accepts(grammar, add_call('{"a": 1, "b_a": 1}'))  # the top level is closed
    assert not accepts(grammar, add_call('{"point": {"x": 2, "y": 3}}'))  # nested object
    assert not accepts(grammar, add_call('{"tags": [{"t": "x", "u": "y"}]}'))  # object inside items
    assert accepts(grammar, add_call('{"free": {"anything": [1, 2]}}'))  # no properties: free-form on purpose
    assert accepts(grammar, add_call('{"extra_ok": {"n": 1}}'))  # extra keys allowed explicitly
    assert not accepts(grammar, add_call('{"extra_ok": {"n": "text"}}'))


def test_closed_schema_recurses_through_combinators_and_definitions() -> None:
    schema: dict[str, Any] = {
        "anyOf": [{"properties": {"a": {}}}, {"type": "string"}],
        "$defs": {"d": {"properties": {"b": {"allOf": [{"properties": {}}]}}}},
        "items": [{"properties": {}}],
    }
    closed = closed_schema(schema)
    assert closed["anyOf"][0]["additionalProperties"] is False and "additionalProperties" not in closed["anyOf"][1]
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["properties"]["b"]["allOf"][0]["additionalProperties"] is False
    assert closed["items"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema["anyOf"][0]  # a copy
    assert closed_schema("not a schema") == "not a schema" and closed_schema([True]) == [True]


def test_a_tool_without_parameters_takes_no_arguments() -> None:
    grammar = forced_tool_call_grammar("hermes", TOOLS, "ping")
    assert not accepts(grammar, '<tool_call>\n{"name": "ping", "arguments": {"x": 1}}\n</tool_call>')


def test_forced_calls_are_bounded() -> None:
    weather = VALID["hermes"]
    ping = '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    required = forced_tool_call_grammar("hermes", TOOLS, None, allow_parallel=True)
    assert accepts(required, weather + "\n" + weather)  # two tools offered: at most two calls, any tools
    assert not accepts(required, "\n".join([weather, ping, ping]))
    named = forced_tool_call_grammar("hermes", TOOLS, "ping", allow_parallel=True)
    assert accepts(named, ping) and not accepts(named, ping + "\n" + ping)  # a named function: one call
    llama = forced_tool_call_grammar("llama3", TOOLS, None, allow_parallel=True)
    assert not accepts(llama, ";".join(['{"name": "ping", "parameters": {}}'] * 3))
    mistral = forced_tool_call_grammar("mistral", TOOLS, None, allow_parallel=True)
    assert not accepts(mistral, "[TOOL_CALLS][" + ",".join(['{"name": "ping", "arguments": {}}'] * 3) + "]")
    assert [max_forced_calls(count, name, parallel) for count, name, parallel in
            [(3, None, True), (3, None, False), (3, "f", True), (0, None, True)]] == [3, 1, 1, 1]  # fmt: skip


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_written_calls_satisfy_the_grammar_and_parse_back(fmt: str) -> None:
    calls = [("get_weather", {"city": "Oslo", "days": 2}), ("ping", {})]
    text = write_tool_calls(fmt, calls)
    assert accepts(forced_tool_call_grammar(fmt, TOOLS, None, allow_parallel=True), text)
    parser = create_tool_parser(fmt, TOOLS)
    parser.feed(text)
    parser.finish()
    assert [(call.name, json.loads(call.arguments)) for call in parser.tool_calls] == calls
    with pytest.raises(ValueError, match="unknown tool-call format"):
        write_tool_calls("xml", calls)
