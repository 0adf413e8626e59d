"""Sampling keyword arguments and response formats from plain Python values to protobuf.

The client's `**sampling` keywords are the fields of `protoserve.v1.SamplingParams` (OpenAI's
names); `max_completion_tokens` is accepted as OpenAI's newer name for `max_tokens`. A keyword set
to None is left unset (the server's default). Types and signs are checked here; ranges the server
checks, so its message names the limit.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from protoserve.client.chat_messages import to_struct
from protoserve.client.errors import InvalidArgument
from protoserve.v1 import common_pb2

FLOAT_OPTIONS = frozenset(
    {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
)
COUNT_OPTIONS = frozenset({"top_k", "seed", "max_tokens", "min_tokens", "n", "top_logprobs"})
FLAG_OPTIONS = frozenset({"ignore_eos", "logprobs", "skip_special_tokens"})
LIST_OPTIONS = frozenset({"stop", "stop_token_ids"})
SAMPLING_OPTIONS = FLOAT_OPTIONS | COUNT_OPTIONS | FLAG_OPTIONS | LIST_OPTIONS | {"logit_bias"}
_COUNT_LIMITS = {"seed": 2**64}  # every other count is a uint32

_RESPONSE_FORMAT_TYPES = {
    "text": common_pb2.ResponseFormat.TYPE_TEXT,
    "json_object": common_pb2.ResponseFormat.TYPE_JSON_OBJECT,
    "json_schema": common_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(name: str, value: Any) -> int:
    limit = _COUNT_LIMITS.get(name, 2**32)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise InvalidArgument(f"{name} must be an integer from 0 to {limit - 1}, got {value!r}")
    return value


def _token_id(value: Any, what: str) -> int:
    if isinstance(value, str) and value.isdigit():  # OpenAI's JSON keys of logit_bias are strings
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise InvalidArgument(f"{what} must be token ids (non-negative integers), got {value!r}")
    return value


def _stop_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidArgument(f"stop must be a string or a list of strings, got {value!r}")


def _unknown_option(name: str) -> InvalidArgument:
    close = difflib.get_close_matches(name, sorted(SAMPLING_OPTIONS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(SAMPLING_OPTIONS))}"
    return InvalidArgument(f"unknown sampling option {name!r}{hint}")


def to_sampling_params(options: Mapping[str, Any], response_format: Any = None) -> common_pb2.SamplingParams:
    """SamplingParams from keyword arguments; unknown names raise `InvalidArgument` with a suggestion."""
    options = dict(options)
    if options.get("max_completion_tokens") is not None:
        if options.get("max_tokens") is not None:
            raise InvalidArgument("give max_tokens or max_completion_tokens, not both")
        options["max_tokens"] = options["max_completion_tokens"]
    options.pop("max_completion_tokens", None)
    params = common_pb2.SamplingParams()
    for name, value in options.items():
        if name not in SAMPLING_OPTIONS:
            raise _unknown_option(name)
        if value is None:
            continue
        if name in FLOAT_OPTIONS:
            if not _is_number(value):
                raise InvalidArgument(f"{name} must be a number, got {value!r}")
            setattr(params, name, float(value))
        elif name in COUNT_OPTIONS:
            setattr(params, name, _count(name, value))
        elif name in FLAG_OPTIONS:
            if not isinstance(value, bool):
                raise InvalidArgument(f"{name} must be True or False, got {value!r}")
            setattr(params, name, value)
        elif name == "stop":
            params.stop.extend(_stop_strings(value))
        elif name == "stop_token_ids":
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise InvalidArgument(f"stop_token_ids must be a list of token ids, got {value!r}")
            params.stop_token_ids.extend(_token_id(item, "stop_token_ids") for item in value)
        else:  # logit_bias
            if not isinstance(value, Mapping):
                raise InvalidArgument(f"logit_bias must be a dict of token id to bias, got {value!r}")
            for token, bias in value.items():
                if not _is_number(bias):
                    raise InvalidArgument(f"logit_bias of token {token!r} must be a number, got {bias!r}")
                params.logit_bias[_token_id(token, "logit_bias keys")] = float(bias)
    format_message = to_response_format(response_format)
    if format_message is not None:
        params.response_format.CopyFrom(format_message)
    return params


def to_response_format(response_format: Any) -> common_pb2.ResponseFormat | None:
    """OpenAI's response_format: "text", "json_object", `{"type": "json_schema", "json_schema": {...}}`."""
    if response_format is None or isinstance(response_format, common_pb2.ResponseFormat):
        return response_format
    if isinstance(response_format, str):
        response_format = {"type": response_format}
    if not isinstance(response_format, Mapping) or response_format.get("type") not in _RESPONSE_FORMAT_TYPES:
        raise InvalidArgument(
            "response_format must be {'type': 'text'}, {'type': 'json_object'} or"
            " {'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
        )
    format_type = response_format["type"]
    message = common_pb2.ResponseFormat(type=_RESPONSE_FORMAT_TYPES[format_type])
    if format_type == "json_schema":
        schema_spec = response_format.get("json_schema")
        if not isinstance(schema_spec, Mapping) or schema_spec.get("schema") is None:
            raise InvalidArgument("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        message.json_schema.CopyFrom(to_struct(schema_spec["schema"], "response_format schema"))
        message.schema_name = str(schema_spec.get("name") or "")
        message.strict = bool(schema_spec.get("strict", False))
    return message
