"""A grammar that forces a model to call tools in its own tool-call format (tool_choice).

The grammar is llguidance's lark syntax: each call is a `%json {schema}` value whose schema pins
the function name and validates the arguments against the tool's `parameters` schema. Markers are
written as plain text (`<tool_call>`, `[TOOL_CALLS]`), so the parser finds them in the decoded text
even when the tokenizer also has them as special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import llguidance
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.parsing.tool_call_formats import TOOL_CALL_FORMATS


def _functions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    functions = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError("each tool must be {'type': 'function', 'function': {'name': ...}}")
        functions.append(function)
    return functions


def _call_schema(function: dict[str, Any], arguments_key: str) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object"}
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"the parameters of tool {function['name']!r} must be a JSON schema object")
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        # Fixed separators, as the formats are trained: with free whitespace a small model can loop on
        # spaces and never close the call.
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    }


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid lark string literal


def forced_tool_call_grammar(
    parser_name: str,
    tools: Sequence[dict[str, Any]],
    function_name: str | None,
    *,
    allow_parallel: bool = False,
) -> str:
    """Lark grammar forcing one call (several when `allow_parallel`) of `function_name`, or of any tool.

    Raises ValueError for an unknown parser name and InvalidRequestError for tools that cannot be
    forced (none given, the named function missing, a parameters schema llguidance cannot enforce).
    """
    fmt = TOOL_CALL_FORMATS.get(parser_name)
    if fmt is None:
        raise ValueError(f"unknown tool-call parser {parser_name!r}; choose one of {', '.join(TOOL_CALL_FORMATS)}")
    functions = _functions(tools)
    if function_name is not None:
        functions = [function for function in functions if function["name"] == function_name]
        if not functions:
            raise InvalidRequestError(f"tool_choice names the function {function_name!r}, but no tool has that name")
    if not functions:
        raise InvalidRequestError("a tool call was required, but the request has no tools")
    arguments_key = "parameters" if fmt.name == "llama3" else "arguments"
    rules = [f"call_{number}: %json {json.dumps(_call_schema(function, arguments_key))}" for number, function in
             enumerate(functions)]  # fmt: skip
    call = "call: " + " | ".join(f"call_{number}" for number in range(len(functions)))
    if fmt.name == "hermes":
        block = f"block: {_lark_string('<tool_call>' + chr(10))} call {_lark_string(chr(10) + '</tool_call>')}"
        start = 'start: block ("\\n" block)*' if allow_parallel else "start: block"
        lines = [start, block]
    elif fmt.name == "llama3":
        lines = ['start: call (";" call)*' if allow_parallel else "start: call"]
    else:
        more = ' ("," call)*' if allow_parallel else ""
        lines = [f'start: {_lark_string("[TOOL_CALLS]")} "[" call{more} "]"']
    grammar = "\n".join([*lines, call, *rules]) + "\n"
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"the tools' parameters schemas cannot be enforced: {error.strip()}")
    return grammar
