"""Conversion between the v1 protobuf messages and the engine's plain data, with validation.

The only place on the generation path where protobuf meets engine types (besides the servicer,
which only moves messages around). Every function is pure: a bad field raises
`InvalidRequestError` whose message names the field, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from protoserve.server.chat.composer import ComposedText, ToolCallPiece
from protoserve.server.engine.api import (
    CompletionDelta,
    FinishReason,
    SamplingParams,
    TokenConstraint,
    TokenLogprob,
    Usage,
)
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.limits import RequestLimits
from protoserve.v1 import common_pb2, generation_pb2

PRIORITY_RANGE = (-100, 100)
LOGIT_BIAS_RANGE = (-100.0, 100.0)


def _decimal(value: float) -> float:
    """A float32 field as the decimal the caller most likely wrote (0.7f reads back as 0.699999988)."""
    return float(f"{value:.7g}")


def _check_range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    inside = (low < value if low_open else low <= value) and value <= high and math.isfinite(value)
    if not inside:
        bracket = "(" if low_open else "["
        raise InvalidRequestError(f"sampling.{field} must be in {bracket}{low}, {high}], got {value}")


def struct_to_python(struct: struct_pb2.Struct, field: str = "a Struct") -> dict[str, Any]:
    """A Struct as plain JSON data; whole numbers come back as ints (Struct stores every number as a double).

    Binary protobuf can hold NaN and Infinity, which JSON cannot: they raise InvalidRequestError naming
    `field` (the request field that holds the Struct) and where inside it the number is.
    """

    def convert(value: struct_pb2.Value, path: str) -> Any:
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            number = value.number_value
            if not math.isfinite(number):
                raise InvalidRequestError(
                    f"{field} has {number} at {path}; numbers must be finite (JSON has no NaN or Infinity)"
                )
            return int(number) if number.is_integer() and abs(number) < 2**53 else number
        if kind == "string_value":
            return value.string_value
        if kind == "bool_value":
            return value.bool_value
        if kind == "struct_value":
            return convert_struct(value.struct_value, path)
        if kind == "list_value":
            return [convert(item, f"{path}[{position}]") for position, item in enumerate(value.list_value.values)]
        return None  # null_value, or no kind set

    def convert_struct(struct: struct_pb2.Struct, path: str) -> dict[str, Any]:
        return {key: convert(item, f"{path}.{key[:80]}" if path else key[:80]) for key, item in struct.fields.items()}

    return convert_struct(struct, "")


@dataclass(frozen=True)
class ResponseFormatSpec:
    """A validated response format that asks for more than free text."""

    kind: str  # "json_object" or "json_schema"
    schema: dict[str, Any] | None = None


def response_format_from_proto(response_format: common_pb2.ResponseFormat) -> ResponseFormatSpec | None:
    """None for free text; otherwise the constraint to build. A JSON schema is checked to be a valid schema."""
    kind = response_format.type
    if kind == common_pb2.ResponseFormat.TYPE_TEXT:
        return None
    if kind == common_pb2.ResponseFormat.TYPE_JSON_OBJECT:
        return ResponseFormatSpec("json_object")
    if kind == common_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        if not response_format.HasField("json_schema"):
            raise InvalidRequestError("sampling.response_format.json_schema is required when type is JSON_SCHEMA")
        schema = struct_to_python(response_format.json_schema, "sampling.response_format.json_schema")
        if "$schema" in schema and not isinstance(schema["$schema"], str):  # validator_for() needs a string
            raise InvalidRequestError(
                "sampling.response_format.json_schema.$schema must be a string (the URI of a JSON Schema "
                f"dialect), got {json.dumps(schema['$schema'])[:80]}"
            )
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as error:
            raise InvalidRequestError(
                f"sampling.response_format.json_schema is not a valid JSON Schema: {error.message}"
            ) from None
        return ResponseFormatSpec("json_schema", schema)
    raise InvalidRequestError(f"sampling.response_format.type {kind} is unknown; use TEXT, JSON_OBJECT or JSON_SCHEMA")


def sampling_params_from_proto(
    sampling: common_pb2.SamplingParams,
    *,
    limits: RequestLimits,
    vocab_size: int,
    constraint_factory: Callable[[], TokenConstraint] | None = None,
) -> SamplingParams:
    """Validated engine `SamplingParams`. Unset optional fields take the OpenAI defaults.

    `max_tokens` stays None when unset; the servicer resolves it against the prompt and context.
    Token ids (stop_token_ids, logit_bias keys) must be below `vocab_size`.
    """
    temperature = _decimal(sampling.temperature) if sampling.HasField("temperature") else 1.0
    _check_range("temperature", temperature, 0.0, 2.0)
    top_p = _decimal(sampling.top_p) if sampling.HasField("top_p") else 1.0
    _check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    min_p = _decimal(sampling.min_p) if sampling.HasField("min_p") else 0.0
    _check_range("min_p", min_p, 0.0, 1.0)
    repetition_penalty = _decimal(sampling.repetition_penalty) if sampling.HasField("repetition_penalty") else 1.0
    _check_range("repetition_penalty", repetition_penalty, 0.0, 2.0, low_open=True)
    presence_penalty = _decimal(sampling.presence_penalty) if sampling.HasField("presence_penalty") else 0.0
    _check_range("presence_penalty", presence_penalty, -2.0, 2.0)
    frequency_penalty = _decimal(sampling.frequency_penalty) if sampling.HasField("frequency_penalty") else 0.0
    _check_range("frequency_penalty", frequency_penalty, -2.0, 2.0)

    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"sampling.max_tokens must be at least 1, got {max_tokens}")
    if max_tokens is not None and sampling.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"sampling.min_tokens ({sampling.min_tokens}) must not exceed sampling.max_tokens ({max_tokens})"
        )

    n = sampling.n or 1
    if n > limits.max_n:
        raise InvalidRequestError(f"sampling.n must be at most {limits.max_n}, got {n}")

    if sampling.top_logprobs > limits.max_top_logprobs:
        raise InvalidRequestError(
            f"sampling.top_logprobs must be at most {limits.max_top_logprobs}, got {sampling.top_logprobs}"
        )
    if sampling.top_logprobs and not sampling.logprobs:
        raise InvalidRequestError("sampling.top_logprobs needs sampling.logprobs set to true")

    stop = tuple(sampling.stop)
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequestError(f"sampling.stop has {len(stop)} strings; at most {limits.max_stop_strings} allowed")
    for position, text in enumerate(stop):
        if not text:
            raise InvalidRequestError(f"sampling.stop[{position}] is empty; stop strings must not be empty")
        if len(text) > limits.max_stop_length:
            raise InvalidRequestError(
                f"sampling.stop[{position}] has {len(text)} characters; at most {limits.max_stop_length} allowed"
            )

    stop_token_ids = tuple(sampling.stop_token_ids)
    _check_token_ids("sampling.stop_token_ids", stop_token_ids, vocab_size)

    logit_bias = _logit_bias(sampling.logit_bias, limits, vocab_size)

    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=sampling.top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=sampling.seed if sampling.HasField("seed") else None,
        max_tokens=max_tokens,
        min_tokens=sampling.min_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=sampling.ignore_eos,
        n=n,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
        logit_bias=logit_bias,
        skip_special_tokens=sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") else True,
        constraint_factory=constraint_factory,
    )


def _check_token_ids(field: str, token_ids: Sequence[int], vocab_size: int) -> None:
    for position, token_id in enumerate(token_ids):
        if token_id >= vocab_size:
            raise InvalidRequestError(
                f"{field}[{position}] is {token_id}, outside the vocabulary (ids 0 to {vocab_size - 1})"
            )


def _logit_bias(entries: Mapping[int, float], limits: RequestLimits, vocab_size: int) -> dict[int, float]:
    if len(entries) > limits.max_logit_bias:
        raise InvalidRequestError(
            f"sampling.logit_bias has {len(entries)} entries; at most {limits.max_logit_bias} allowed"
        )
    low, high = LOGIT_BIAS_RANGE
    bias: dict[int, float] = {}
    for token_id, value in sorted(entries.items()):
        if token_id >= vocab_size:
            raise InvalidRequestError(
                f"sampling.logit_bias has token id {token_id}, outside the vocabulary (ids 0 to {vocab_size - 1})"
            )
        value = _decimal(value)
        if not (low <= value <= high):
            raise InvalidRequestError(f"sampling.logit_bias[{token_id}] must be in [{low}, {high}], got {value}")
        bias[token_id] = value
    return bias


def check_prompt_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    """A caller-given prompt of token ids must be non-empty and inside the vocabulary."""
    if not token_ids:
        raise InvalidRequestError("token_ids is empty; give at least one prompt token")
    _check_token_ids("token_ids.ids", token_ids, vocab_size)


def request_identity(options: common_pb2.RequestOptions, limits: RequestLimits) -> tuple[str, int]:
    """The request id (the caller's, or `req-<uuid>`) and the validated priority."""
    request_id = options.request_id
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidRequestError(
            f"options.request_id has {len(request_id)} characters; at most {limits.max_request_id_chars} allowed"
        )
    if request_id and not request_id.isprintable():
        raise InvalidRequestError("options.request_id must contain printable characters only")
    low, high = PRIORITY_RANGE
    if not low <= options.priority <= high:
        raise InvalidRequestError(f"options.priority must be in [{low}, {high}], got {options.priority}")
    return request_id or f"req-{uuid.uuid4().hex}", options.priority


# ---- engine output -> protobuf ----


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte 0-255 is written as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = 256 + extra
            extra += 1
    return {chr(character): byte for byte, character in characters.items()}


_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Each token's text (as decoding it alone gives) and its exact bytes, cached per id.

    Bytes are exact for byte-level BPE tokenizers (GPT-2 style) and byte-fallback SentencePiece
    tokens (`<0xAB>`); other tokenizers fall back to the UTF-8 of the decoded text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._alphabet = _byte_level_alphabet() if self._byte_level else {}
        self._special_ids = set(getattr(tokenizer, "all_special_ids", ()))
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def text_of(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def bytes_of(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._token_bytes(token_id)
        return cached

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self._special_ids:
            if self._byte_level and all(character in self._alphabet for character in piece):
                return bytes(self._alphabet[character] for character in piece)
            fallback = _BYTE_FALLBACK_TOKEN.fullmatch(piece)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
        return self.text_of(token_id).encode("utf-8")


_FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def finish_reason_to_proto(reason: FinishReason | None, *, called_tools: bool) -> int:
    """The proto enum; a choice that stopped normally after calling tools reports TOOL_CALLS."""
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    if reason is FinishReason.STOP and called_tools:
        return common_pb2.FINISH_REASON_TOOL_CALLS
    return _FINISH_REASONS[reason]


def logprobs_to_proto(logprobs: Iterable[TokenLogprob], token_text: TokenText) -> list[common_pb2.TokenLogprob]:
    """Engine log-probabilities with each token's text and exact bytes."""
    converted = []
    for entry in logprobs:
        converted.append(
            common_pb2.TokenLogprob(
                token=token_text.text_of(entry.token_id),
                token_id=entry.token_id,
                logprob=entry.logprob,
                token_bytes=token_text.bytes_of(entry.token_id),
                top_logprobs=[
                    common_pb2.TopLogprob(
                        token=token_text.text_of(top.token_id),
                        token_id=top.token_id,
                        logprob=top.logprob,
                        token_bytes=token_text.bytes_of(top.token_id),
                    )
                    for top in entry.top
                ],
            )
        )
    return converted


def choice_delta_to_proto(
    delta: CompletionDelta, composed: ComposedText, *, called_tools: bool, token_text: TokenText
) -> generation_pb2.ChoiceDelta:
    """One choice's step: the engine's token ids and logprobs, the composer's text, reasoning and tool calls."""
    return generation_pb2.ChoiceDelta(
        index=delta.index,
        text=composed.text,
        reasoning_text=composed.reasoning,
        token_ids=delta.token_ids,
        logprobs=logprobs_to_proto(delta.logprobs or (), token_text),
        tool_calls=[tool_call_delta_to_proto(piece) for piece in composed.tool_calls],
        finish_reason=finish_reason_to_proto(delta.finish_reason, called_tools=called_tools),
        stop_reason="" if delta.stop_reason is None else str(delta.stop_reason),
    )


def tool_call_delta_to_proto(piece: ToolCallPiece) -> generation_pb2.ToolCallDelta:
    return generation_pb2.ToolCallDelta(index=piece.index, id=piece.id, name=piece.name, arguments=piece.arguments)


def usage_to_proto(usage: Usage, reasoning_tokens: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        reasoning_tokens=reasoning_tokens,
    )


def result_from_chunks(chunks: Sequence[generation_pb2.GenerationChunk]) -> generation_pb2.GenerationResult:
    """Fold a whole stream into the unary reply, so a unary reply always equals its joined stream."""
    if not chunks:
        raise ValueError("result_from_chunks needs at least one chunk")
    first = chunks[0]
    result = generation_pb2.GenerationResult(request_id=first.request_id, model=first.model, created=first.created)
    choices: dict[int, generation_pb2.Choice] = {}
    for chunk in chunks:
        for delta in chunk.choices:
            choice = choices.setdefault(delta.index, generation_pb2.Choice(index=delta.index))
            choice.text += delta.text
            choice.reasoning_text += delta.reasoning_text
            choice.token_ids.extend(delta.token_ids)
            choice.logprobs.extend(delta.logprobs)
            for piece in delta.tool_calls:
                while len(choice.tool_calls) <= piece.index:
                    choice.tool_calls.add(type="function")
                call = choice.tool_calls[piece.index]
                call.id = call.id or piece.id
                call.function.name = call.function.name or piece.name
                call.function.arguments += piece.arguments
            if delta.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                choice.finish_reason = delta.finish_reason
                choice.stop_reason = delta.stop_reason
        if chunk.HasField("usage"):
            result.usage.CopyFrom(chunk.usage)
    result.choices.extend(choices[index] for index in sorted(choices))
    return result
