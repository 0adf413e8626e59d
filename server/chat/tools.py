"""Tools offered to the model and the caller's tool_choice, validated into a plan.

How each tool_choice is served:
- auto (the default when tools are given): the template shows the tools; the output is parsed for calls.
- none: the tools are NOT shown to the template and the output is not parsed, so the model answers in
  text. (Shown-but-unparsed tools invite the model to write call markup into its answer.) Tool calls
  and tool results already in the conversation are still rendered.
- required / a named function: the template shows the tools, decoding is constrained by the tool
  parser's forced-call grammar (so the reply is a well-formed call, to the named function if one is
  named), and the output is parsed like auto. A named function is called once; required allows at
  most one call per offered tool (`protoserve.server.parsing.tool_call_grammar`).

Which format calls are parsed in: `--tool-parser NAME`, or with "auto" the format the chat template
names, else hermes. Templates that never show tools get them in a system text
(`protoserve.server.chat.tool_prompt`).
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protoserve.server.convert import struct_to_python
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.limits import RequestLimits
from protoserve.v1 import generation_pb2

logger = logging.getLogger(__name__)

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolMode(enum.Enum):
    NONE = "none"  # no tools shown, no parsing
    AUTO = "auto"  # tools shown, output parsed
    REQUIRED = "required"  # decoding forced into a call to any tool, then parsed
    NAMED = "named"  # decoding forced into a call to `function_name`, then parsed


@dataclass(frozen=True)
class ToolPlan:
    """What to do with tools for one request. `tools` are the template-ready definitions."""

    mode: ToolMode
    tools: list[dict[str, Any]]
    function_name: str | None = None
    parallel_tool_calls: bool = True

    @property
    def shows_tools(self) -> bool:
        return self.mode is not ToolMode.NONE and bool(self.tools)

    @property
    def parses_output(self) -> bool:
        return self.shows_tools

    @property
    def forces_call(self) -> bool:
        return self.mode in (ToolMode.REQUIRED, ToolMode.NAMED)


def tools_from_proto(tools: Sequence[generation_pb2.Tool], limits: RequestLimits) -> list[dict[str, Any]]:
    """Template-ready tool definitions (`{"type": "function", "function": {...}}`), validated."""
    if len(tools) > limits.max_tools:
        raise InvalidRequestError(f"tools has {len(tools)} entries; at most {limits.max_tools} allowed")
    converted = []
    seen: set[str] = set()
    for position, tool in enumerate(tools):
        where = f"tools[{position}]"
        if tool.type not in ("", "function"):
            raise InvalidRequestError(f"{where}.type is {tool.type!r}; only 'function' tools are supported")
        name = tool.function.name
        if not FUNCTION_NAME.fullmatch(name):
            raise InvalidRequestError(
                f"{where}.function.name {name[:80]!r} is not allowed; use 1 to 64 letters, digits, '_' or '-'"
            )
        if name in seen:
            raise InvalidRequestError(f"{where}.function.name {name!r} is given twice; tool names must be unique")
        seen.add(name)
        parameters = (
            struct_to_python(tool.function.parameters, f"{where}.function.parameters")
            if tool.function.HasField("parameters")
            else EMPTY_PARAMETERS
        )
        function: dict[str, Any] = {"name": name, "parameters": parameters}
        if tool.function.description:
            function["description"] = tool.function.description
        converted.append({"type": "function", "function": function})
    size = len(json.dumps(converted))
    if size > limits.max_tool_schema_chars:
        raise InvalidRequestError(
            f"the tools' definitions are {size} characters as JSON; at most {limits.max_tool_schema_chars} allowed"
        )
    return converted


def tool_plan_from_request(request: generation_pb2.ChatRequest, limits: RequestLimits) -> ToolPlan:
    """Validate tools, tool_choice and parallel_tool_calls together."""
    tools = tools_from_proto(request.tools, limits)
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    choice = request.tool_choice
    kind = choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if kind == "function_name":
        names = [tool["function"]["name"] for tool in tools]
        if choice.function_name not in names:
            offered = ", ".join(names) or "none"
            raise InvalidRequestError(
                f"tool_choice names function {choice.function_name!r}, which is not among the tools "
                f"(offered: {offered})"
            )
        return ToolPlan(ToolMode.NAMED, tools, choice.function_name, parallel)
    mode = choice.mode if kind == "mode" else generation_pb2.ToolChoice.MODE_AUTO
    if mode == generation_pb2.ToolChoice.MODE_NONE:
        return ToolPlan(ToolMode.NONE, tools, None, parallel)
    if mode == generation_pb2.ToolChoice.MODE_REQUIRED:
        if not tools:
            raise InvalidRequestError("tool_choice is required but no tools are given; add tools or use auto")
        return ToolPlan(ToolMode.REQUIRED, tools, None, parallel)
    if mode != generation_pb2.ToolChoice.MODE_AUTO:
        raise InvalidRequestError(f"tool_choice.mode {mode} is unknown; use AUTO, NONE or REQUIRED")
    return ToolPlan(ToolMode.AUTO, tools, None, parallel)


# Used when a template reveals no tool-call format: the most common one.
FALLBACK_TOOL_PARSER = "hermes"
_models_told_about_fallback: set[str] = set()


def resolve_tool_parser_name(plan: ToolPlan, configured: str, detected: str | None, model_id: str) -> str | None:
    """The tool parser for a request whose output is parsed: the server's `--tool-parser`, or for
    "auto" the format detected from the chat template, else `FALLBACK_TOOL_PARSER` (logged once per
    model). With "none" replies are never parsed (tools are still shown), and a forced call is
    refused, since it needs a known format."""
    if configured == "none":
        if plan.forces_call:
            raise InvalidRequestError(
                "tool_choice required or a named function needs a tool-call format, but this server runs "
                "with --tool-parser none; use tool_choice auto or none"
            )
        return None
    if configured and configured != "auto":
        return configured
    if detected is None:
        if model_id not in _models_told_about_fallback:
            _models_told_about_fallback.add(model_id)
            logger.warning(
                "the chat template of model %r names no tool-call format; tool calls are read as %s "
                "(<tool_call>{json}</tool_call>). Start the server with --tool-parser NAME to choose another.",
                model_id,
                FALLBACK_TOOL_PARSER,
            )
        return FALLBACK_TOOL_PARSER
    return detected
