"""Tools and tool_choice: OpenAI chat's nested shape and the Responses API's flat shape -> proto."""

from __future__ import annotations

import json
from typing import Any

from protoserve.translator.errors import invalid_request
from protoserve.translator.mapping.fields import Fields, as_list
from protoserve.v1.generation_pb2 import FunctionCall, FunctionDefinition, Tool, ToolCall, ToolChoice

_MODES = {"auto": ToolChoice.MODE_AUTO, "none": ToolChoice.MODE_NONE, "required": ToolChoice.MODE_REQUIRED}


def _function_definition(function: Fields) -> FunctionDefinition:
    definition = FunctionDefinition(
        name=function.string("name"),
        description=function.optional_string("description") or "",
        strict=bool(function.optional_bool("strict")),
    )
    parameters = function.optional_struct("parameters")
    if parameters is not None:
        definition.parameters.CopyFrom(parameters)
    return definition


def _check_function_type(tool: Fields) -> None:
    kind = tool.optional_string("type") or "function"
    if kind != "function":
        raise invalid_request(
            f"'{tool.param('type')}': only function tools are supported, not {kind!r}", param=tool.param("type")
        )


def tools(value: Any, param: str, flat: bool = False) -> list[Tool]:
    """Chat tools `[{"type": "function", "function": {...}}]`, or with `flat` the Responses shape
    `[{"type": "function", "name", "parameters", ...}]`."""
    result = []
    for index, item in enumerate(as_list(value, param)):
        tool = Fields(item, f"{param}[{index}]")
        _check_function_type(tool)
        if flat:
            function = tool
        else:
            function_fields = tool.optional_object("function")
            if function_fields is None:
                raise invalid_request(f"'{tool.param('function')}' is required", param=tool.param("function"))
            function = function_fields
        result.append(Tool(type="function", function=_function_definition(function)))
    return result


def tool_choice(value: Any, param: str) -> ToolChoice:
    """ "auto" | "none" | "required" | {"type": "function", "function": {"name"}} (chat)
    | {"type": "function", "name"} (responses)."""
    if isinstance(value, str):
        if value not in _MODES:
            raise invalid_request(f"'{param}' must be auto, none, required or a function, not {value!r}", param=param)
        return ToolChoice(mode=_MODES[value])
    choice = Fields(value, param)
    _check_function_type(choice)
    function = choice.optional_object("function")
    name = function.string("name") if function is not None else choice.string("name")
    return ToolChoice(function_name=name)


def tool_calls(value: Any, param: str) -> list[ToolCall]:
    """An assistant message's earlier `tool_calls` (arguments as JSON text; objects are serialized)."""
    result = []
    for index, item in enumerate(as_list(value, param)):
        call = Fields(item, f"{param}[{index}]")
        _check_function_type(call)
        function = call.optional_object("function")
        if function is None:
            raise invalid_request(f"'{call.param('function')}' is required", param=call.param("function"))
        arguments = function.get("arguments")
        if arguments is None:
            arguments_text = "{}"
        elif isinstance(arguments, str):
            arguments_text = arguments
        elif isinstance(arguments, dict):
            arguments_text = json.dumps(arguments, ensure_ascii=False)
        else:
            raise invalid_request(
                f"'{function.param('arguments')}' must be a JSON string", param=function.param("arguments")
            )
        result.append(
            ToolCall(
                id=call.optional_string("id") or "",
                type="function",
                function=FunctionCall(name=function.string("name"), arguments=arguments_text),
            )
        )
    return result
