"""A grammar that forces a model to call tools in its own tool-call format (tool_choice).

The grammar is llguidance's lark syntax: each call is a `%json {schema}` value whose schema pins
the function name and validates the arguments against the tool's `parameters` schema. Markers are
written as plain text (`<tool_call>`, `[TOOL_CALLS]`, `[ARGS]`), so the parser finds them in the
decoded text even when the tokenizer also has them as special tokens. In the mistral_v11 form the
function name is part of the text before `[ARGS]` and only the arguments are a `%json` value.

Two rules keep a forced reply finite, so a small greedy model cannot run on until max_tokens:
- Closed objects: every object schema that lists `properties` and says nothing about
  `additionalProperties` is closed (`additionalProperties: false`), as OpenAI's strict mode does.
  Without it the grammar lets the model add keys forever. A schema that allows extra keys explicitly
  (`additionalProperties: true` or a schema) keeps them; an object schema without `properties` stays
  free-form. The caller's schema is copied, never changed.
- Bounded calls: a named function is called exactly once (as OpenAI and vLLM do); `required` allows
  one call when parallel calls are off and otherwise at most one call per offered tool
  (`max_forced_calls`). A caller that wants several calls to one tool uses tool_choice auto.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import llguidance
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.parsing.tool_call_formats import TOOL_CALL_FORMATS

# Keys whose value is one subschema, or a list of subschemas, or a map of name -> subschema.
_SUBSCHEMA_KEYS = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_SUBSCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def closed_schema(schema: Any) -> Any:
    """A copy of `schema` where each object schema with `properties` and no `additionalProperties`
    gets `additionalProperties: false`, at every depth (properties, items, anyOf, $defs, ...)."""
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA_KEYS:
        if isinstance(closed.get(key), dict):
            closed[key] = closed_schema(closed[key])
    for key in _SUBSCHEMA_LIST_KEYS:
        if isinstance(closed.get(key), list):
            closed[key] = [closed_schema(item) for item in closed[key]]
    for key in _SUBSCHEMA_MAP_KEYS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: closed_schema(value) for name, value in closed[key].items()}
    if isinstance(closed.get("additionalProperties"), dict):
        closed["additionalProperties"] = closed_schema(closed["additionalProperties"])
    if isinstance(closed.get("properties"), dict) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def max_forced_calls(tool_count: int, function_name: str | None, allow_parallel: bool) -> int:
    """How many calls a forced reply may hold: see the module docstring."""
    if function_name is not None or not allow_parallel:
        return 1
    return max(1, tool_count)


def _functions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    functions = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError("each tool must be {'type': 'function', 'function': {'name': ...}}")
        functions.append(function)
    return functions


# Fixed separators, as the formats are trained: with free whitespace a small model can loop on
# spaces and never close the call.
_FIXED_SEPARATORS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or _NO_PARAMETERS
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"the parameters of tool {function['name']!r} must be a JSON schema object")
    return dict(closed_schema(parameters))


def _call_schema(function: dict[str, Any], arguments_key: str) -> dict[str, Any]:
    """The schema of a whole call object, `{"name": <this function>, <arguments_key>: {...}}`."""
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: _parameters_schema(function)},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        "x-guidance": _FIXED_SEPARATORS,
    }


def _call_rule(function: dict[str, Any], arguments_key: str, named_arguments: bool) -> str:
    """The body of one function's grammar rule: a call object, or (`named_arguments`, Mistral v11)
    `[TOOL_CALLS]name[ARGS]` and the arguments object."""
    if not named_arguments:
        return f"%json {json.dumps(_call_schema(function, arguments_key))}"
    arguments = {**_parameters_schema(function), "x-guidance": _FIXED_SEPARATORS}
    return f"{_lark_string('[TOOL_CALLS]' + function['name'] + '[ARGS]')} %json {json.dumps(arguments)}"


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid lark string literal


def _more(separator: str, item: str, extra_calls: int) -> str:
    """Up to `extra_calls` more items, each after `separator` (empty when none are allowed)."""
    return f" ({separator} {item}){{0,{extra_calls}}}" if extra_calls > 0 else ""


def forced_tool_call_grammar(
    parser_name: str,
    tools: Sequence[dict[str, Any]],
    function_name: str | None,
    *,
    allow_parallel: bool = False,
) -> str:
    """Lark grammar forcing a call of `function_name`, or of any tool; several calls (at most
    `max_forced_calls`) only when `allow_parallel` and no function is named.

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
    extra_calls = max_forced_calls(len(functions), function_name, allow_parallel) - 1
    arguments_key = "parameters" if fmt.name == "llama3" else "arguments"
    named_arguments = fmt.name == "mistral_v11"
    rules = [f"call_{number}: {_call_rule(function, arguments_key, named_arguments)}" for number, function in
             enumerate(functions)]  # fmt: skip
    call = "call: " + " | ".join(f"call_{number}" for number in range(len(functions)))
    if fmt.name == "hermes":
        block = f"block: {_lark_string('<tool_call>' + chr(10))} call {_lark_string(chr(10) + '</tool_call>')}"
        lines = ["start: block" + _more('"\\n"', "block", extra_calls), block]
    elif fmt.name == "llama3":
        lines = ["start: call" + _more('";"', "call", extra_calls)]
    elif named_arguments:  # each call opens with its own [TOOL_CALLS]: nothing between calls
        lines = ["start: call" + (f" call{{0,{extra_calls}}}" if extra_calls > 0 else "")]
    else:
        more_calls = _more('","', "call", extra_calls)
        lines = [f'start: {_lark_string("[TOOL_CALLS]")} "[" call{more_calls} "]"']
    grammar = "\n".join([*lines, call, *rules]) + "\n"
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"the tools' parameters schemas cannot be enforced: {error.strip()}")
    return grammar
