"""The tool-call formats models are trained on, and how to recognise them from a chat template.

- hermes (Qwen 2.5/3, Hermes, many fine-tunes): each call is
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; several calls are several blocks.
- llama3 (Llama 3.1-3.3 JSON tool calling): `{"name": ..., "parameters": {...}}` at the start of the
  output, or after `<|python_tag|>`; several calls are separated by `;`.
- mistral (tokenizers before v11: Mistral 7B v0.3, Nemo, Small 22B, Large 2407):
  `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.
- mistral_v11 (tokenizers v11 and later: Mistral Small 3.1+, Magistral, Devstral): each call is
  `[TOOL_CALLS]name[ARGS]{...arguments...}`; several calls repeat the pattern. Recognised from a
  chat template that writes `[ARGS]`.

Both Mistral parsers read both Mistral forms (a model does not always write the one its template
teaches); they differ in how calls are written back (`write_tool_calls`) and forced (grammar).
A `[CALL_ID]id` that some tokenizers put between the name and `[ARGS]` is read and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ToolCallFormat:
    """How one format marks its calls. The parser is generic; this is all that differs."""

    name: str
    start_markers: tuple[str, ...]  # text that opens a region of calls
    # Compact (whitespace-free) prefixes that open a region when they begin the output.
    output_start_prefixes: tuple[str, ...] = ()
    list_open: str | None = None  # a region may wrap its calls in a list: "[" ... "]"
    list_close: str | None = None
    separator: str | None = None  # between calls of one region
    region_end: str | None = None  # closes a region of exactly one call
    # A call may also be written as a function name, this marker, then the arguments object.
    arguments_marker: str | None = None
    call_id_marker: str | None = None  # may come between that name and arguments_marker, with an id


HERMES = ToolCallFormat(name="hermes", start_markers=("<tool_call>",), region_end="</tool_call>")
LLAMA3 = ToolCallFormat(
    name="llama3", start_markers=("<|python_tag|>",), output_start_prefixes=('{"name"', '{"type"'), separator=";"
)
MISTRAL = ToolCallFormat(
    name="mistral",
    start_markers=("[TOOL_CALLS]",),
    list_open="[",
    list_close="]",
    separator=",",
    arguments_marker="[ARGS]",
    call_id_marker="[CALL_ID]",
)
MISTRAL_V11 = replace(MISTRAL, name="mistral_v11")

TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {fmt.name: fmt for fmt in (HERMES, LLAMA3, MISTRAL, MISTRAL_V11)}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model, or None when it names none."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral_v11" if "[ARGS]" in chat_template else "mistral"
    if "<|python_tag|>" in chat_template or (
        "<|start_header_id|>" in chat_template and '"parameters"' in chat_template
    ):
        return "llama3"
    return None


def write_tool_calls(format_name: str, calls: Sequence[tuple[str, Any]]) -> str:
    """Calls `(name, arguments)` written as a model of that format writes them (and the forced-call
    grammar admits them): JSON with ", " and ": " separators."""
    if format_name == "hermes":
        return "\n".join(
            "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"
            for name, arguments in calls
        )
    if format_name == "llama3":
        return ";".join(json.dumps({"name": name, "parameters": arguments}) for name, arguments in calls)
    if format_name == "mistral":
        written = (json.dumps({"name": name, "arguments": arguments}) for name, arguments in calls)
        return "[TOOL_CALLS][" + ",".join(written) + "]"
    if format_name == "mistral_v11":
        return "".join(f"[TOOL_CALLS]{name}[ARGS]{json.dumps(arguments)}" for name, arguments in calls)
    raise ValueError(f"unknown tool-call format {format_name!r}; choose one of {', '.join(TOOL_CALL_FORMATS)}")
