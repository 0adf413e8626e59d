"""Streaming tool-call parser: text deltas in, text and tool-call events out.

Invariants:
- Text passes through as soon as it cannot be part of a call marker; only an ambiguous suffix (the
  start of a marker, or trailing whitespace that may precede one) is held back until the next delta
  or `finish()`. Whitespace between calls, before a call and at the end after calls is dropped.
- Whatever the chunking of the same output, the events joined are the same (same text, same calls
  with the same names and argument text, same errors); only ids are random.
- A call is announced (first `ToolCallDelta` with id and name) once its name is read and known;
  its arguments then stream as generated, and concatenate to the JSON text of the arguments object.
  A `ToolCallEnd` follows the last delta of every call that completed and is valid.
- An invalid call (bad JSON, unknown tool, cut off) becomes a `ToolCallError` with its raw text; it is
  never dropped and never appears in `tool_calls`. See `events.py`.
- A call is a JSON object (`{"name": ..., "arguments": {...}}`), or, in formats with an arguments
  marker, a function name, the marker and the arguments object (`get_weather[ARGS]{"city": "Oslo"}`);
  after the region's start marker, `{` or the list opener means the first, anything else the second.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Sequence
from typing import Any

from protoserve.server.parsing.call_object import CallObjectResult, CallObjectScanner
from protoserve.server.parsing.events import (
    ParsedToolCall,
    ParseEvent,
    TextEvent,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallError,
)
from protoserve.server.parsing.tool_call_formats import TOOL_CALL_FORMATS, ToolCallFormat, detect_tool_parser
from protoserve.server.parsing.tool_call_grammar import forced_tool_call_grammar

__all__ = [
    "ToolCallStreamParser",
    "create_tool_parser",
    "detect_tool_parser",
    "forced_tool_call_grammar",
    "tool_names",
]


class _Mode(enum.Enum):
    TEXT = "text"
    REGION_START = "region_start"  # just after a start marker
    BEFORE_CALL = "before_call"  # a call object is expected next
    NAME = "name"  # a function name, up to the arguments marker
    IN_CALL = "in_call"
    AFTER_CALL = "after_call"  # a separator, the region's end, or text
    SKIP_REGION = "skip_region"  # after a broken call: swallow up to the region's end


def tool_names(tools: Sequence[dict[str, Any]]) -> set[str]:
    """Function names of OpenAI-style tools (`{"type": "function", "function": {"name": ...}}`)."""
    names = set()
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,256}")  # OpenAI allows [A-Za-z0-9_-]{1,64}; a little more here


def _name_problem(segment: str, fmt: ToolCallFormat, complete: bool) -> str | None:
    """Why `segment` (the text between the start marker and the arguments marker, or its part
    received so far when not `complete`) cannot be a function name with an optional call id."""
    if not complete:
        markers = [marker for marker in (fmt.arguments_marker, fmt.call_id_marker) if marker]
        segment = segment[: len(segment) - _held_marker_length(segment, markers)]
    name, _, call_id = segment.partition(fmt.call_id_marker) if fmt.call_id_marker else (segment, "", "")
    problem = (
        f"expected a JSON object, or a function name followed by {fmt.arguments_marker}, after {fmt.start_markers[0]}"
    )
    for part in (name.strip(), call_id.strip()):
        if part and not _FUNCTION_NAME.fullmatch(part):
            return problem
    if complete and not name.strip():
        return problem
    return None


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _held_marker_length(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    longest = max((len(marker) for marker in markers), default=1)
    for length in range(min(len(text), longest - 1), 0, -1):
        suffix = text[-length:]
        if any(marker.startswith(suffix) for marker in markers):
            return length
    return 0


class ToolCallStreamParser:
    """Parses one choice's output in a given format. Feed deltas, then call `finish()` once."""

    def __init__(self, fmt: ToolCallFormat, tools: Sequence[dict[str, Any]]) -> None:
        self.format = fmt
        self.known_names = tool_names(tools)
        self.tool_calls: list[ParsedToolCall] = []
        self._pending = ""
        self._mode = _Mode.TEXT
        self._at_output_start = True
        self._in_list = False
        self._calls_in_region = 0
        self._scanner = CallObjectScanner()
        self._skipped = ""  # raw text of a broken region
        self._skip_reason = ""
        self._skip_index: int | None = None
        self._call_index: int | None = None  # index of the call being announced
        self._call_id = ""
        self._call_raw_prefix = ""  # what the model wrote before the scanned text: "name[ARGS]"
        self._streamed_arguments = 0
        self._next_index = 0
        self._finished = False

    # ---- public -------------------------------------------------------------------------------

    def feed(self, text_delta: str) -> list[ParseEvent]:
        """Consume the next piece of output; return the events it completes."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._pending += text_delta
        events: list[ParseEvent] = []
        self._advance(events, final=False)
        return events

    def finish(self) -> list[ParseEvent]:
        """The output ended: flush held text and report a call left open."""
        if self._finished:
            return []
        self._finished = True
        events: list[ParseEvent] = []
        self._advance(events, final=True)
        mode = self._mode
        if mode is _Mode.TEXT:
            self._emit_text(events, self._pending.rstrip() if self.tool_calls else self._pending)
        elif mode is _Mode.IN_CALL:
            events.append(self._error(self._call_raw_text() + self._pending, "the output ended inside a tool call"))
        elif mode is _Mode.NAME:
            marker = self.format.arguments_marker
            events.append(ToolCallError(None, self._pending, f"the output ended before {marker} in a tool call"))
        elif mode is _Mode.SKIP_REGION:
            events.append(self._skip_error())
        elif mode in (_Mode.REGION_START, _Mode.BEFORE_CALL) and self._calls_in_region == 0:
            marker = self.format.start_markers[0]
            events.append(ToolCallError(None, marker, f"the output ended after {marker} without a tool call"))
        self._pending = ""
        return events

    # ---- the state machine --------------------------------------------------------------------

    def _advance(self, events: list[ParseEvent], final: bool) -> None:
        steps = {
            _Mode.TEXT: self._step_text,
            _Mode.REGION_START: self._step_region_start,
            _Mode.BEFORE_CALL: self._step_before_call,
            _Mode.NAME: self._step_name,
            _Mode.IN_CALL: self._step_in_call,
            _Mode.AFTER_CALL: self._step_after_call,
            _Mode.SKIP_REGION: self._step_skip_region,
        }
        while self._pending and steps[self._mode](events, final):
            pass

    def _emit_text(self, events: list[ParseEvent], text: str) -> None:
        if text:
            self._at_output_start = False
            events.append(TextEvent(text))

    def _step_text(self, events: list[ParseEvent], final: bool) -> bool:
        fmt, text = self.format, self._pending
        if self._at_output_start and fmt.output_start_prefixes:
            compact = "".join(text.split())
            if any(compact.startswith(prefix) for prefix in fmt.output_start_prefixes):
                self._pending = text.lstrip()
                self._start_region(_Mode.BEFORE_CALL)
                return True
            if not final and any(prefix.startswith(compact) for prefix in fmt.output_start_prefixes):
                return False  # only whitespace, or the start of a call: wait for more
        positions = [(text.find(marker), marker) for marker in fmt.start_markers if marker in text]
        if positions:
            position, marker = min(positions)
            self._emit_text(events, text[:position].rstrip())
            self._pending = text[position + len(marker) :]
            self._start_region(_Mode.REGION_START)
            return True
        if final:
            return False
        cut = len(text) - _held_marker_length(text, fmt.start_markers)
        while cut > 0 and text[cut - 1].isspace():
            cut -= 1
        self._emit_text(events, text[:cut])
        self._pending = text[cut:]
        return False

    def _start_region(self, mode: _Mode) -> None:
        self._at_output_start = False
        self._in_list = False
        self._calls_in_region = 0
        self._mode = mode

    def _step_region_start(self, events: list[ParseEvent], final: bool) -> bool:
        stripped = self._pending.lstrip()
        if not stripped:
            self._pending = ""
            return False
        fmt = self.format
        self._pending = stripped
        marker = fmt.arguments_marker
        if marker and not final and marker.startswith(stripped) and stripped != marker:
            return False  # "[" may open a list or begin the arguments marker (a call without a name)
        if marker and stripped.startswith(marker):
            self._mode = _Mode.NAME  # reports the missing name
            return True
        if fmt.list_open and stripped.startswith(fmt.list_open):
            self._in_list = True
            self._pending = stripped[len(fmt.list_open) :]
        elif fmt.arguments_marker and not stripped.startswith("{"):
            self._mode = _Mode.NAME
            return True
        self._mode = _Mode.BEFORE_CALL
        return True

    def _step_before_call(self, events: list[ParseEvent], final: bool) -> bool:
        stripped = self._pending.lstrip()
        self._pending = stripped
        if not stripped:
            return False
        if stripped.startswith("{"):
            self._begin_call(CallObjectScanner(), raw_prefix="")
            return True
        if self._in_list and self.format.list_close and stripped.startswith(self.format.list_close):
            self._pending = stripped[len(self.format.list_close) :]
            self._end_region()
            return True
        self._begin_skip("", None, "expected a JSON object for the tool call")
        return True

    def _begin_call(self, scanner: CallObjectScanner, raw_prefix: str) -> None:
        self._scanner, self._call_raw_prefix = scanner, raw_prefix
        self._call_index, self._call_id, self._streamed_arguments = None, "", 0
        self._mode = _Mode.IN_CALL

    def _call_raw_text(self) -> str:
        """What the model wrote of the current call so far."""
        return self._call_raw_prefix + self._scanner.raw_text

    def _step_name(self, events: list[ParseEvent], final: bool) -> bool:
        fmt, text = self.format, self._pending
        marker = fmt.arguments_marker or ""
        position = text.find(marker)
        segment = text if position < 0 else text[:position]
        problem = _name_problem(segment, fmt, complete=position >= 0)
        if problem is not None:
            self._begin_skip("", None, problem)  # the text stays pending: the skip takes it as raw text
            return True
        if position < 0:
            return False  # the name goes on, or the marker is still arriving
        name = segment.partition(fmt.call_id_marker)[0] if fmt.call_id_marker else segment
        self._pending = text[position + len(marker) :]
        self._begin_call(CallObjectScanner(arguments_of=name.strip()), raw_prefix=segment + marker)
        self._announce_and_stream(events)  # the name is known now, before any argument arrives
        return True

    def _step_in_call(self, events: list[ParseEvent], final: bool) -> bool:
        scanner = self._scanner
        used = scanner.feed(self._pending)
        self._pending = self._pending[used:]
        self._announce_and_stream(events)
        if scanner.error is not None:
            self._begin_skip(self._call_raw_text(), self._call_index, scanner.error)
        elif scanner.complete:
            self._complete_call(events)
            self._mode = _Mode.AFTER_CALL
        return True

    def _announce_and_stream(self, events: list[ParseEvent]) -> None:
        scanner = self._scanner
        if self._call_index is None and scanner.name is not None and scanner.name in self.known_names:
            self._call_index, self._call_id = self._next_index, _new_call_id()
            self._next_index += 1
            events.append(ToolCallDelta(index=self._call_index, id=self._call_id, name=scanner.name))
        if self._call_index is not None and scanner.arguments_is_object:
            arguments = scanner.arguments_so_far()  # only grows: the scanner refuses a second arguments key
            if len(arguments) > self._streamed_arguments:
                events.append(ToolCallDelta(index=self._call_index, arguments=arguments[self._streamed_arguments :]))
                self._streamed_arguments = len(arguments)

    def _complete_call(self, events: list[ParseEvent]) -> None:
        scanner = self._scanner
        self._calls_in_region += 1
        result = scanner.result()
        if result.error is None and result.name not in self.known_names:
            known = ", ".join(sorted(self.known_names)) or "none"
            result = CallObjectResult(
                result.name, "", f"the model called an unknown tool {result.name!r} (tools: {known})"
            )
        if result.error is not None:
            events.append(ToolCallError(self._call_index, self._call_raw_text(), result.error))
            return
        if self._call_index is None:  # the name was read too late to announce before completion
            self._call_index, self._call_id = self._next_index, _new_call_id()
            self._next_index += 1
            events.append(ToolCallDelta(index=self._call_index, id=self._call_id, name=result.name))
        if self._streamed_arguments == 0:
            events.append(ToolCallDelta(index=self._call_index, arguments=result.arguments))
        self.tool_calls.append(ParsedToolCall(id=self._call_id, name=result.name, arguments=result.arguments))
        events.append(ToolCallEnd(self._call_index))

    def _step_after_call(self, events: list[ParseEvent], final: bool) -> bool:
        fmt = self.format
        stripped = self._pending.lstrip()
        self._pending = stripped
        if not stripped:
            return False
        if fmt.region_end is not None:
            if stripped.startswith(fmt.region_end):
                self._pending = stripped[len(fmt.region_end) :]
                self._end_region()
                return True
            if fmt.region_end.startswith(stripped):  # the end marker, partly received
                if final:
                    self._pending = ""
                    self._end_region()
                return False
            self._begin_skip("", None, f"unexpected text after a tool call, before {fmt.region_end}")
            return True
        if fmt.separator is not None and stripped.startswith(fmt.separator) and (self._in_list or not fmt.list_open):
            self._pending = stripped[len(fmt.separator) :]
            self._mode = _Mode.BEFORE_CALL
            return True
        if self._in_list and fmt.list_close and stripped.startswith(fmt.list_close):
            self._pending = stripped[len(fmt.list_close) :]
        self._end_region()
        return True

    def _end_region(self) -> None:
        self._mode = _Mode.TEXT

    def _begin_skip(self, raw: str, index: int | None, reason: str) -> None:
        self._skipped, self._skip_index, self._skip_reason = raw, index, reason
        self._mode = _Mode.SKIP_REGION

    def _step_skip_region(self, events: list[ParseEvent], final: bool) -> bool:
        end = self.format.region_end
        if end is None:  # the broken region runs to the end of the output
            self._skipped += self._pending
            self._pending = ""
            return False
        position = self._pending.find(end)
        if position < 0:
            keep = 0 if final else _held_marker_length(self._pending, (end,))
            self._skipped += self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep :]
            return False
        self._skipped += self._pending[:position]
        self._pending = self._pending[position + len(end) :]
        events.append(self._skip_error())
        self._end_region()
        return True

    def _skip_error(self) -> ToolCallError:
        return ToolCallError(self._skip_index, self._skipped, self._skip_reason)

    def _error(self, raw: str, message: str) -> ToolCallError:
        return ToolCallError(self._call_index, raw, message)


def create_tool_parser(name: str, tools: Sequence[dict[str, Any]]) -> ToolCallStreamParser:
    """A parser for format `name` (hermes, llama3, mistral, mistral_v11) checking names against `tools`."""
    fmt = TOOL_CALL_FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(TOOL_CALL_FORMATS)}")
    return ToolCallStreamParser(fmt, tools)
