"""Typed reads of fields from a parsed JSON request, with 400 errors that name the field.

JSON `null` counts as absent everywhere, as OpenAI clients send `null` for unset options. Numbers
are checked against what their protobuf field can hold (uint32, int32, uint64); ranges that depend
on the model or the server's policy are the server's to check.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.struct_pb2 import Struct
from protoserve.translator.errors import invalid_request

UINT32_MAX = 2**32 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT64_MAX = 2**64 - 1
_STRUCT_MAX_DEPTH = 64


def type_name(value: Any) -> str:
    """The JSON type name of a parsed value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _wrong_type(param: str, expected: str, value: Any) -> Exception:
    return invalid_request(f"'{param}' must be {expected}, not {type_name(value)}", param=param)


def as_object(value: Any, param: str) -> dict[str, Any]:
    """`value` as a JSON object, or a 400 naming `param`."""
    if not isinstance(value, dict):
        raise _wrong_type(param, "an object", value)
    return value


def as_list(value: Any, param: str) -> list[Any]:
    """`value` as a JSON array, or a 400 naming `param`."""
    if not isinstance(value, list):
        raise _wrong_type(param, "an array", value)
    return value


def as_string(value: Any, param: str) -> str:
    """`value` as a string, or a 400 naming `param`."""
    if not isinstance(value, str):
        raise _wrong_type(param, "a string", value)
    return value


def as_int(value: Any, param: str, minimum: int, maximum: int) -> int:
    """`value` as an integer in [minimum, maximum] (integral floats such as 5.0 are accepted)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(param, "an integer", value)
    if isinstance(value, float):
        if not value.is_integer():
            raise invalid_request(f"'{param}' must be an integer, not {value!r}", param=param)
        value = int(value)
    if not minimum <= value <= maximum:
        raise invalid_request(f"'{param}' must be between {minimum} and {maximum}, not {value}", param=param)
    return value


def as_float(value: Any, param: str) -> float:
    """`value` as a finite float; its range is the server's to check."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(param, "a number", value)
    try:
        number = float(value)
    except OverflowError:
        raise invalid_request(f"'{param}' is too large", param=param) from None
    if not math.isfinite(number):
        raise invalid_request(f"'{param}' must be a finite number", param=param)
    return number


def as_bool(value: Any, param: str) -> bool:
    """`value` as a JSON boolean (no 0/1 or strings), or a 400 naming `param`."""
    if not isinstance(value, bool):
        raise _wrong_type(param, "a boolean", value)
    return value


def _check_struct_value(value: Any, param: str, depth: int) -> None:
    if depth > _STRUCT_MAX_DEPTH:
        raise invalid_request(f"'{param}' is nested more than {_STRUCT_MAX_DEPTH} levels deep", param=param)
    if isinstance(value, dict):
        for item in value.values():
            _check_struct_value(item, param, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_struct_value(item, param, depth + 1)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        as_float(value, param)


def as_struct(value: Any, param: str) -> Struct:
    """A JSON object as a protobuf Struct (numbers become doubles), or a 400 naming `param`."""
    mapping = as_object(value, param)
    _check_struct_value(mapping, param, 0)
    struct = Struct()
    try:
        struct.update(mapping)
    except (ValueError, TypeError, RecursionError) as error:
        raise invalid_request(f"'{param}' cannot be represented: {error}", param=param) from None
    return struct


class Fields:
    """Read access to one JSON object of a request; `path` prefixes the names in error messages."""

    def __init__(self, value: Any, path: str = "") -> None:
        self.path = path
        self.data = as_object(value, path or "body")

    def param(self, key: str) -> str:
        """The dotted name of `key` inside this object."""
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> Any:
        """The raw value, None when absent or null."""
        return self.data.get(key)

    def has(self, key: str) -> bool:
        """Whether `key` is present and not null."""
        return self.data.get(key) is not None

    def required(self, key: str) -> Any:
        value = self.data.get(key)
        if value is None:
            raise invalid_request(f"'{self.param(key)}' is required", param=self.param(key))
        return value

    def string(self, key: str) -> str:
        return as_string(self.required(key), self.param(key))

    def optional_string(self, key: str) -> str | None:
        value = self.data.get(key)
        return None if value is None else as_string(value, self.param(key))

    def optional_bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        return None if value is None else as_bool(value, self.param(key))

    def optional_float(self, key: str) -> float | None:
        value = self.data.get(key)
        return None if value is None else as_float(value, self.param(key))

    def optional_int(self, key: str, minimum: int, maximum: int) -> int | None:
        value = self.data.get(key)
        return None if value is None else as_int(value, self.param(key), minimum, maximum)

    def optional_list(self, key: str) -> list[Any] | None:
        value = self.data.get(key)
        return None if value is None else as_list(value, self.param(key))

    def optional_object(self, key: str) -> Fields | None:
        value = self.data.get(key)
        return None if value is None else Fields(value, self.param(key))

    def optional_struct(self, key: str) -> Struct | None:
        value = self.data.get(key)
        return None if value is None else as_struct(value, self.param(key))
