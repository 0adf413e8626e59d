"""Reads one tool-call JSON object, `{"name": ..., "arguments": {...}}`, a character at a time.

The scanner follows JSON's structure (strings, escapes, nesting) closely enough to know, while the
object is still arriving, the call's name as soon as its string is closed, and where the arguments
value starts and ends, so the arguments can be streamed as they are generated. It also refuses
characters that cannot appear in JSON outside strings and mismatched brackets, so a broken call is
noticed early. It also refuses a key that is not a valid JSON string, and a second "name" key or
arguments key ("arguments" or "parameters"): `json.loads` would keep the last one, so the name
announced and the arguments streamed while the object arrives would not be the call's.

The complete object is checked by `result()` with a strict `json.loads`: NaN, Infinity and numbers
beyond a float's range (which Python reads but JSON cannot carry), and integers too long for
Python to read, make the call invalid, as does nesting too deep to parse. `result()` never raises.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

ARGUMENT_KEYS = ("arguments", "parameters")
_BARE_VALUE_CHARACTERS = frozenset("0123456789-+.eEtruefalsn")
_CLOSING = {"}": "{", "]": "["}


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as infinity
        raise ValueError(text)
    return value


def _refuse_constant(text: str) -> Any:
    raise ValueError(text)  # NaN, Infinity, -Infinity


def _decode(text: str) -> tuple[Any, str | None]:
    """`text` read as strict JSON, and None; or None and why it is not (a RecursionError propagates)."""
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_refuse_constant), None
    except json.JSONDecodeError as error:
        return None, error.msg
    except ValueError:  # from the two above, or an integer over Python's digit limit
        return None, "a number that is not finite, beyond a float's range or too long"


@dataclass(frozen=True)
class CallObjectResult:
    """The checked object: the call's name and its arguments as JSON text (or why it is invalid)."""

    name: str
    arguments: str
    error: str | None = None


class CallObjectScanner:
    """Consumes characters of one JSON object; `complete` or `error` is set when it ends.

    `CallObjectScanner(arguments_of=name)` reads only the arguments object of a call whose name
    was written before it (Mistral's `name[ARGS]{...}`): it is primed with the text
    `{"name": <name>, "arguments": ` and closes the object itself when the arguments object
    closes, so everything else (streaming, `result()`) works as for a whole call object.
    `raw_text` is what was fed, without the priming and the closing brace.
    """

    def __init__(self, arguments_of: str | None = None) -> None:
        self.text = ""
        self.complete = False
        self.error: str | None = None
        self.name: str | None = None  # set once the "name" string value is closed
        self._named = False  # a "name" key was read (its value may not be a string)
        self._stack: list[str] = []
        self._in_string = False
        self._escaped = False
        self._string_is_key = False
        self._top_state = "key"  # at depth 1: key, colon, value, in_value, after_value
        self._key_start = 0
        self._key: str | None = None
        self._value_start = 0
        self.arguments_start: int | None = None  # index of the arguments value's first character
        self.arguments_end: int | None = None  # index after its last character, once closed
        self._arguments_only = arguments_of is not None
        self._raw_start = 0
        if arguments_of is not None:
            self.feed('{"name": ' + json.dumps(arguments_of) + ', "arguments": ')
            self._raw_start = len(self.text)

    @property
    def raw_text(self) -> str:
        """The characters fed by the caller (for an arguments-only scanner, the arguments text)."""
        end = self.arguments_end if self._arguments_only and self.complete else len(self.text)
        return self.text[self._raw_start : end]

    @property
    def arguments_is_object(self) -> bool:
        return self.arguments_start is not None and self.text[self.arguments_start] == "{"

    def arguments_so_far(self) -> str:
        """The arguments value's text received so far ("" before it starts)."""
        if self.arguments_start is None:
            return ""
        return self.text[self.arguments_start : self.arguments_end]

    def feed(self, text: str) -> int:
        """Consume characters until the object completes or an error; return how many were used."""
        for used, character in enumerate(text, start=1):
            self.text += character
            self._step(character, len(self.text) - 1)
            if self.complete or self.error is not None:
                return used
        return len(text)

    def _fail(self, message: str) -> None:
        self.error = message

    def _step(self, character: str, index: int) -> None:
        if not self._stack:
            if character != "{":
                self._fail("a tool call must be a JSON object")
                return
            self._stack.append("{")
            return
        if self._in_string:
            self._step_in_string(character, index)
            return
        if character.isspace():
            if len(self._stack) == 1 and self._top_state == "in_value":
                self._end_top_value(index)
            return
        if len(self._stack) == 1:
            self._step_top_level(character, index)
        else:
            self._step_nested(character, index)

    def _step_in_string(self, character: str, index: int) -> None:
        if self._escaped:
            self._escaped = False
        elif character == "\\":
            self._escaped = True
        elif character == '"':
            self._in_string = False
            if len(self._stack) == 1:
                if self._string_is_key:
                    self._read_key(self.text[self._key_start : index + 1])
                else:
                    self._end_top_value(index + 1)

    def _read_key(self, text: str) -> None:
        """Take a top-level key's JSON string; fail on a broken one, or a repeated name or arguments key."""
        try:
            key = json.loads(text)
        except json.JSONDecodeError as error:  # a raw control character, a bad escape
            self._fail(f"a key in the tool call is not a valid JSON string ({error.msg})")
            return
        if key == "name" and self._named:
            self._fail('the tool call has more than one "name" key')
            return
        if key in ARGUMENT_KEYS and self.arguments_start is not None:
            self._fail('the tool call has more than one arguments key ("arguments" or "parameters")')
            return
        self._named = self._named or key == "name"
        self._key, self._top_state = key, "colon"

    def _step_top_level(self, character: str, index: int) -> None:
        state = self._top_state
        if state == "key":
            if character == '"':
                self._in_string, self._string_is_key, self._key_start = True, True, index
            elif character == "}" and self._key is None:
                self._close_object()
            else:
                self._fail(f"expected a quoted key in the tool call, found {character!r}")
        elif state == "colon":
            if character == ":":
                self._top_state = "value"
            else:
                self._fail(f"expected ':' after a key in the tool call, found {character!r}")
        elif state == "value":
            self._start_top_value(character, index)
        elif state == "in_value":  # a bare value (number, true, false, null)
            if character in ",}":
                self._end_top_value(index)
                self._step_top_level(character, index)
            elif character not in _BARE_VALUE_CHARACTERS:
                self._fail(f"unexpected {character!r} in the tool call")
        elif character == ",":  # after_value
            self._top_state = "key"
        elif character == "}":
            self._close_object()
        else:
            self._fail(f"expected ',' or '}}' in the tool call, found {character!r}")

    def _start_top_value(self, character: str, index: int) -> None:
        self._value_start = index
        if self._arguments_only and self._key in ARGUMENT_KEYS and character != "{":
            self._fail(f"the tool call's arguments must be a JSON object, not text starting with {character!r}")
            return
        if self._key in ARGUMENT_KEYS:
            self.arguments_start, self.arguments_end = index, None
        if character == '"':
            self._in_string, self._string_is_key = True, False
            self._top_state = "in_value"
        elif character in "{[":
            self._stack.append(character)
            self._top_state = "in_value"
        elif character in _BARE_VALUE_CHARACTERS:
            self._top_state = "in_value"
        else:
            self._fail(f"unexpected {character!r} where a value belongs in the tool call")

    def _end_top_value(self, end: int) -> None:
        if self._key == "name" and self.text[self._value_start] == '"':  # not a deep array: no recursion
            try:
                self.name = json.loads(self.text[self._value_start : end])
            except json.JSONDecodeError:
                pass
        self._top_state = "after_value"
        if self._key in ARGUMENT_KEYS:
            self.arguments_end = end
            if self._arguments_only:  # the caller's text was only the arguments: close the call here
                self.text += "}"
                self._close_object()

    def _step_nested(self, character: str, index: int) -> None:
        if character == '"':
            self._in_string, self._string_is_key = True, False
        elif character in "{[":
            self._stack.append(character)
        elif character in _CLOSING:
            if self._stack[-1] != _CLOSING[character]:
                self._fail(f"mismatched {character!r} in the tool call's JSON")
                return
            self._stack.pop()
            if len(self._stack) == 1:
                self._end_top_value(index + 1)
        elif character not in ",:" and character not in _BARE_VALUE_CHARACTERS:
            self._fail(f"unexpected {character!r} in the tool call's JSON")

    def _close_object(self) -> None:
        self._stack.pop()
        self.complete = True

    def result(self) -> CallObjectResult:
        """Check the complete object; arguments come back as generated, or compact when re-encoded."""
        try:
            return self._checked()
        except RecursionError:  # json.loads, == or json.dumps on values nested too deep
            return CallObjectResult("", "", "the tool call is not valid JSON (nested too deeply)")

    def _checked(self) -> CallObjectResult:
        parsed, problem = _decode(self.text)
        if problem is not None:
            return CallObjectResult("", "", f"the tool call is not valid JSON ({problem})")
        name = parsed.get("name")
        if not isinstance(name, str) or not name:
            return CallObjectResult("", "", 'the tool call has no "name" string')
        key = next((key for key in ARGUMENT_KEYS if key in parsed), None)
        arguments = parsed.get(key, {}) if key else {}
        if isinstance(arguments, str):  # some models send the arguments as a JSON string
            arguments, problem = _decode(arguments)
            if problem is not None:
                return CallObjectResult(name, "", f"the tool call's arguments string is not JSON ({problem})")
        if not isinstance(arguments, dict):
            return CallObjectResult(name, "", "the tool call's arguments are not a JSON object")
        if self.arguments_is_object and _decode(self.arguments_so_far())[0] == arguments:
            return CallObjectResult(name, self.arguments_so_far())
        return CallObjectResult(name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":")))
