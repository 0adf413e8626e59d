"""convert.py: sampling validation, response formats, output conversion, token bytes, unary folding."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2
from protoserve.server.chat.composer import ComposedText, ToolCallPiece
from protoserve.server.convert import (
    TokenText,
    check_prompt_token_ids,
    choice_delta_to_proto,
    finish_reason_to_proto,
    request_identity,
    response_format_from_proto,
    result_from_chunks,
    sampling_params_from_proto,
    struct_to_python,
    usage_to_proto,
)
from protoserve.server.engine.api import CompletionDelta, FinishReason, TokenLogprob, TopToken, Usage
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.limits import RequestLimits
from protoserve.v1 import common_pb2, generation_pb2

try:
    from .generation_fakes import tiny_tokenizer
except ImportError:
    from generation_fakes import tiny_tokenizer  # type: ignore[no-redef]

LIMITS = RequestLimits()
VOCAB = 1000


def params(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)  # type: ignore[arg-type]


def test_defaults_are_openai_defaults() -> None:
    converted = sampling_params_from_proto(params(), limits=LIMITS, vocab_size=VOCAB)
    assert converted.temperature == 1.0 and converted.top_p == 1.0 and converted.n == 1
    assert converted.max_tokens is None and converted.seed is None and converted.skip_special_tokens is True
    assert converted.constraint_factory is None


def test_values_are_carried_and_float32_noise_removed() -> None:
    converted = sampling_params_from_proto(
        params(
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            presence_penalty=-0.5,
            frequency_penalty=0.3,
            seed=2**63 + 5,
            max_tokens=12,
            min_tokens=2,
            stop=["\n\n", "END"],
            stop_token_ids=[7],
            ignore_eos=True,
            n=3,
            logprobs=True,
            top_logprobs=5,
            logit_bias={5: 2.5, 9: -100},
            skip_special_tokens=False,
        ),
        limits=LIMITS,
        vocab_size=VOCAB,
    )
    assert converted.temperature == 0.7 and converted.top_p == 0.9 and converted.min_p == 0.05
    assert converted.top_k == 40 and converted.repetition_penalty == 1.1 and converted.presence_penalty == -0.5
    assert converted.seed == 2**63 + 5 and converted.max_tokens == 12 and converted.min_tokens == 2
    assert converted.stop == ("\n\n", "END") and converted.stop_token_ids == (7,) and converted.ignore_eos
    assert converted.n == 3 and converted.logprobs and converted.top_logprobs == 5
    assert converted.logit_bias == {5: 2.5, 9: -100.0} and converted.skip_special_tokens is False


def test_temperature_zero_is_greedy() -> None:
    assert sampling_params_from_proto(params(temperature=0), limits=LIMITS, vocab_size=VOCAB).greedy


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 2.5}, "temperature must be in [0.0, 2.0]"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p must be in (0.0, 1.0]"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": 2, "min_tokens": 5}, "min_tokens (5) must not exceed"),
        ({"n": 9}, "n must be at most 8"),
        ({"top_logprobs": 3}, "top_logprobs needs sampling.logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be at most 20"),
        ({"stop": ["a"] * 17}, "at most 16 allowed"),
        ({"stop": [""]}, "stop[0] is empty"),
        ({"stop": ["x" * 300]}, "stop[0] has 300 characters"),
        ({"stop_token_ids": [3, VOCAB]}, f"stop_token_ids[1] is {VOCAB}, outside the vocabulary"),
        ({"logit_bias": {VOCAB + 1: 1.0}}, "outside the vocabulary"),
        ({"logit_bias": {3: 101.0}}, "logit_bias[3] must be in [-100.0, 100.0]"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "at most 300 allowed"),
    ],
)
def test_bad_sampling_is_rejected_with_the_field_named(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        sampling_params_from_proto(params(**fields), limits=LIMITS, vocab_size=VOCAB)
    assert message in str(raised.value)


def test_limits_are_configurable() -> None:
    strict = RequestLimits(max_n=2, max_logit_bias=1)
    with pytest.raises(InvalidRequestError, match="n must be at most 2"):
        sampling_params_from_proto(params(n=3), limits=strict, vocab_size=VOCAB)
    with pytest.raises(InvalidRequestError, match="at most 1 allowed"):
        sampling_params_from_proto(params(logit_bias={1: 1, 2: 1}), limits=strict, vocab_size=VOCAB)


def test_response_formats() -> None:
    text = common_pb2.ResponseFormat()
    assert response_format_from_proto(text) is None
    json_object = common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.TYPE_JSON_OBJECT)
    assert response_format_from_proto(json_object).kind == "json_object"  # type: ignore[union-attr]
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}})
    spec = response_format_from_proto(
        common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=schema)
    )
    assert spec is not None and spec.schema == {
        "type": "object",
        "properties": {"n": {"type": "integer", "maximum": 3}},
    }


def test_bad_response_formats() -> None:
    with pytest.raises(InvalidRequestError, match="json_schema is required"):
        response_format_from_proto(common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.TYPE_JSON_SCHEMA))
    broken = struct_pb2.Struct()
    broken.update({"type": "no-such-type"})
    with pytest.raises(InvalidRequestError, match="not a valid JSON Schema"):
        response_format_from_proto(
            common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=broken)
        )


def test_struct_to_python_keeps_whole_numbers_integers() -> None:
    struct = struct_pb2.Struct()
    struct.update({"a": 1, "b": 1.5, "c": [2, {"d": 3.0}], "e": None, "f": True})
    assert struct_to_python(struct) == {"a": 1, "b": 1.5, "c": [2, {"d": 3}], "e": None, "f": True}
    assert isinstance(struct_to_python(struct)["a"], int)


def test_prompt_token_ids_checked() -> None:
    check_prompt_token_ids([1, 2], VOCAB)
    with pytest.raises(InvalidRequestError, match="token_ids is empty"):
        check_prompt_token_ids([], VOCAB)
    with pytest.raises(InvalidRequestError, match=r"token_ids.ids\[1\] is 5000"):
        check_prompt_token_ids([1, 5000], VOCAB)


def test_request_identity() -> None:
    request_id, priority = request_identity(common_pb2.RequestOptions(request_id="mine", priority=-3), LIMITS)
    assert (request_id, priority) == ("mine", -3)
    made, _ = request_identity(common_pb2.RequestOptions(), LIMITS)
    assert made.startswith("req-") and len(made) > 10
    for options, message in [
        (common_pb2.RequestOptions(priority=101), "priority must be in [-100, 100]"),
        (common_pb2.RequestOptions(request_id="x" * 300), "at most 256 allowed"),
        (common_pb2.RequestOptions(request_id="bad\nid"), "printable"),
    ]:
        with pytest.raises(InvalidRequestError) as raised:
            request_identity(options, LIMITS)
        assert message in str(raised.value)


def test_finish_reason_mapping() -> None:
    assert finish_reason_to_proto(None, called_tools=False) == common_pb2.FINISH_REASON_UNSPECIFIED
    assert finish_reason_to_proto(FinishReason.STOP, called_tools=False) == common_pb2.FINISH_REASON_STOP
    assert finish_reason_to_proto(FinishReason.STOP, called_tools=True) == common_pb2.FINISH_REASON_TOOL_CALLS
    assert finish_reason_to_proto(FinishReason.LENGTH, called_tools=True) == common_pb2.FINISH_REASON_LENGTH
    assert finish_reason_to_proto(FinishReason.ABORT, called_tools=False) == common_pb2.FINISH_REASON_ABORT
    assert finish_reason_to_proto(FinishReason.ERROR, called_tools=False) == common_pb2.FINISH_REASON_ERROR


def test_token_text_gives_exact_bytes_of_partial_characters() -> None:
    tokenizer = tiny_tokenizer()
    token_text = TokenText(tokenizer)
    ids = tokenizer.encode("é world", add_special_tokens=False)
    assert b"".join(token_text.bytes_of(token_id) for token_id in ids) == "é world".encode()
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_text.text_of(special) == "<|im_end|>" and token_text.bytes_of(special) == b"<|im_end|>"


def test_choice_delta_with_logprobs_text_and_bytes() -> None:
    tokenizer = tiny_tokenizer()
    token_text = TokenText(tokenizer)
    hello = tokenizer.encode("hello", add_special_tokens=False)[0]
    delta = CompletionDelta(
        index=1,
        text="hello",
        token_ids=(hello,),
        logprobs=(TokenLogprob(hello, -0.25, (TopToken(hello, -0.25), TopToken(5, -3.0))),),
        finish_reason=FinishReason.STOP,
        stop_reason="END",
    )
    composed = ComposedText(text="hello", reasoning="hmm", tool_calls=[ToolCallPiece(0, "call_0", "f", "{}")])
    proto = choice_delta_to_proto(delta, composed, called_tools=False, token_text=token_text)
    assert proto.index == 1 and proto.text == "hello" and proto.reasoning_text == "hmm"
    assert list(proto.token_ids) == [hello] and proto.stop_reason == "END"
    assert proto.finish_reason == common_pb2.FINISH_REASON_STOP
    assert proto.logprobs[0].token == tokenizer.decode([hello]) and proto.logprobs[0].logprob == -0.25
    assert proto.logprobs[0].token_bytes == tokenizer.decode([hello]).encode()
    assert [top.token_id for top in proto.logprobs[0].top_logprobs] == [hello, 5]
    assert proto.tool_calls[0].name == "f" and proto.tool_calls[0].id == "call_0"
    stop_token = CompletionDelta(0, "", (), finish_reason=FinishReason.STOP, stop_reason=7)
    assert (
        choice_delta_to_proto(stop_token, ComposedText(), called_tools=False, token_text=token_text).stop_reason == "7"
    )


def test_usage() -> None:
    usage = usage_to_proto(Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=4), reasoning_tokens=2)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 5, 15)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (4, 2)


def test_result_from_chunks_joins_every_field() -> None:
    def chunk(
        *choices: generation_pb2.ChoiceDelta, usage: common_pb2.Usage | None = None
    ) -> generation_pb2.GenerationChunk:
        return generation_pb2.GenerationChunk(request_id="r", model="m", created=5, choices=choices, usage=usage)

    chunks = [
        chunk(
            generation_pb2.ChoiceDelta(index=1, text="b", token_ids=[2]), generation_pb2.ChoiceDelta(index=0, text="a")
        ),
        chunk(
            generation_pb2.ChoiceDelta(
                index=0, reasoning_text="r", tool_calls=[generation_pb2.ToolCallDelta(index=0, id="c", name="f")]
            )
        ),
        chunk(
            generation_pb2.ChoiceDelta(
                index=0, tool_calls=[generation_pb2.ToolCallDelta(index=0, arguments='{"x": 1}')]
            ),
            generation_pb2.ChoiceDelta(index=1, text="c", finish_reason=common_pb2.FINISH_REASON_LENGTH),
        ),
        chunk(
            generation_pb2.ChoiceDelta(index=0, finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS),
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
        ),
    ]
    result = result_from_chunks(chunks)
    assert (result.request_id, result.model, result.created) == ("r", "m", 5)
    first, second = result.choices
    assert first.index == 0 and first.text == "a" and first.reasoning_text == "r"
    assert first.tool_calls[0].id == "c" and first.tool_calls[0].type == "function"
    assert first.tool_calls[0].function.name == "f" and first.tool_calls[0].function.arguments == '{"x": 1}'
    assert first.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert (
        second.text == "bc"
        and list(second.token_ids) == [2]
        and second.finish_reason == common_pb2.FINISH_REASON_LENGTH
    )
    assert result.usage.total_tokens == 7
    with pytest.raises(ValueError):
        result_from_chunks([])
