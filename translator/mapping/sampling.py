"""OpenAI sampling options -> protoserve SamplingParams, shared by chat, completions and responses."""

from __future__ import annotations

from typing import Any

from protoserve.translator.errors import invalid_request
from protoserve.translator.mapping.fields import (
    INT32_MAX,
    UINT32_MAX,
    UINT64_MAX,
    Fields,
    as_float,
    as_int,
    as_string,
)
from protoserve.v1.common_pb2 import ResponseFormat, SamplingParams


def stop_strings(value: Any, param: str) -> list[str]:
    """OpenAI's `stop`: one string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [as_string(item, f"{param}[{index}]") for index, item in enumerate(value)]
    raise invalid_request(f"'{param}' must be a string or an array of strings", param=param)


def logit_bias(value: Any, param: str) -> dict[int, float]:
    """OpenAI's `logit_bias`: an object from token id (as a string) to a bias."""
    fields = Fields(value, param)
    biases: dict[int, float] = {}
    for key, bias in fields.data.items():
        if not (key.isascii() and key.isdigit()):  # int() would also take " 7 ", "1_0" and other scripts' digits
            raise invalid_request(f"'{param}' keys must be token ids, not {key!r}", param=param)
        token_id = int(key)
        if not 0 <= token_id <= UINT32_MAX:
            raise invalid_request(f"'{param}' has an impossible token id {key!r}", param=param)
        biases[token_id] = as_float(bias, f"{param}.{key}")
    return biases


def response_format(fields: Fields) -> ResponseFormat:
    """OpenAI's `response_format` (also huggingface_hub's `{"type": "json_object", "value": schema}`)."""
    kind = fields.string("type")
    if kind == "text":
        return ResponseFormat(type=ResponseFormat.TYPE_TEXT)
    if kind == "json_object":
        schema = fields.optional_struct("value") or fields.optional_struct("schema")
        if schema is not None:
            return ResponseFormat(type=ResponseFormat.TYPE_JSON_SCHEMA, json_schema=schema)
        return ResponseFormat(type=ResponseFormat.TYPE_JSON_OBJECT)
    if kind == "json_schema":
        definition = fields.optional_object("json_schema")
        if definition is None:
            raise invalid_request(
                f"'{fields.param('json_schema')}' is required when type is json_schema",
                param=fields.param("json_schema"),
            )
        return json_schema_format(definition)
    raise invalid_request(
        f"'{fields.param('type')}' must be one of text, json_object, json_schema, not {kind!r}",
        param=fields.param("type"),
    )


def json_schema_format(definition: Fields) -> ResponseFormat:
    """A `{"name", "schema", "strict"}` object as a TYPE_JSON_SCHEMA ResponseFormat."""
    schema = definition.optional_struct("schema")
    if schema is None:
        raise invalid_request(f"'{definition.param('schema')}' is required", param=definition.param("schema"))
    return ResponseFormat(
        type=ResponseFormat.TYPE_JSON_SCHEMA,
        json_schema=schema,
        schema_name=definition.optional_string("name") or "",
        strict=bool(definition.optional_bool("strict")),
    )


def sampling_params(fields: Fields, max_tokens_keys: tuple[str, ...]) -> SamplingParams:
    """The options every generation route shares. `max_tokens_keys`: the names of the token limit,
    most preferred first (chat takes max_completion_tokens over max_tokens). Logprobs and the
    response format differ between routes and are set by their callers."""
    sampling = SamplingParams()
    for key in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        number = fields.optional_float(key)
        if number is not None:
            setattr(sampling, key, number)
    top_k = fields.optional_int("top_k", -1, UINT32_MAX)
    if top_k is not None and top_k > 0:  # -1 and 0 both mean "off", as in vLLM
        sampling.top_k = top_k
    seed = fields.optional_int("seed", -(2**63), UINT64_MAX)
    if seed is not None:
        sampling.seed = seed % 2**64  # negative seeds (allowed by OpenAI) wrap to the same 64 bits
    for key in max_tokens_keys:
        limit = fields.optional_int(key, 0, UINT32_MAX)
        if limit is not None:
            sampling.max_tokens = limit
            break
    sampling.min_tokens = fields.optional_int("min_tokens", 0, UINT32_MAX) or 0
    if fields.has("stop"):
        sampling.stop.extend(stop_strings(fields.get("stop"), fields.param("stop")))
    stop_token_ids = fields.optional_list("stop_token_ids")
    for index, token_id in enumerate(stop_token_ids or ()):
        sampling.stop_token_ids.append(as_int(token_id, f"{fields.param('stop_token_ids')}[{index}]", 0, UINT32_MAX))
    sampling.ignore_eos = bool(fields.optional_bool("ignore_eos"))
    sampling.n = fields.optional_int("n", 0, INT32_MAX) or 0
    if fields.has("logit_bias"):
        for token_id, bias in logit_bias(fields.get("logit_bias"), fields.param("logit_bias")).items():
            sampling.logit_bias[token_id] = bias
    skip_special_tokens = fields.optional_bool("skip_special_tokens")
    if skip_special_tokens is not None:
        sampling.skip_special_tokens = skip_special_tokens
    return sampling
