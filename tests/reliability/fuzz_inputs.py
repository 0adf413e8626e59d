"""Hypothesis strategies for hostile inputs: JSON bodies for every REST route, multipart uploads,
and protobuf messages with random and oversize field values."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st
from protoserve.v1 import common_pb2, generation_pb2, transcription_pb2

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
edge_numbers = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, 10**30, -(10**30), 0.5, -0.0, 1e308, 1e-308])
any_number = st.one_of(edge_numbers, st.integers(-5, 100), st.floats(-5, 5, allow_nan=False))
field_value = st.one_of(any_number, scalars, json_values)
unicode_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]), max_size=60
)  # any code point except lone surrogates (JSON cannot carry those as UTF-8)

image_urls = st.one_of(
    st.just("data:image/png;base64,@@@@"),
    st.just("data:image/png;base64,iVBORw0KGgo="),  # a truncated PNG
    st.just("data:text/plain;base64,aGVsbG8="),
    st.just("data:image/png,notbase64"),
    st.just("file:///etc/passwd"),
    st.just("http://169.254.169.254/latest/meta-data/"),
    st.just("http://127.0.0.1:1/x.png"),
    unicode_text,
)
content_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": unicode_text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_urls})}),
    st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": json_values}),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer"]), unicode_text),
            "content": st.one_of(unicode_text, st.lists(content_parts, max_size=3), json_values),
        }
    )
    | json_values,
    max_size=4,
)
SAMPLING_FIELDS = [
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "top_logprobs", "logit_bias",
    "stream", "stream_options", "response_format", "tools", "tool_choice", "user", "priority",
    "chat_template_kwargs", "ignore_eos", "min_tokens",
]  # fmt: skip


def _optional_fields(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(names), field_value, max_size=6)


def chat_bodies(model: str) -> st.SearchStrategy[Any]:
    """Chat bodies: mostly well-shaped with hostile values, sometimes any JSON at all."""
    shaped = st.builds(
        lambda model_name, conversation, extra: {"model": model_name, "messages": conversation, **extra},
        st.one_of(st.just(model), unicode_text),
        messages,
        _optional_fields(SAMPLING_FIELDS),
    )
    return st.one_of(shaped, shaped, shaped, json_values)


def completion_bodies(model: str) -> st.SearchStrategy[Any]:
    prompt = st.one_of(unicode_text, st.lists(st.integers(-5, 2**33), max_size=8), json_values)
    shaped = st.builds(
        lambda conversation, extra: {"model": model, "prompt": conversation, **extra},
        prompt,
        _optional_fields(SAMPLING_FIELDS + ["echo", "suffix", "best_of"]),
    )
    return st.one_of(shaped, shaped, json_values)


def responses_bodies(model: str) -> st.SearchStrategy[Any]:
    shaped = st.builds(
        lambda conversation, extra: {"model": model, "input": conversation, **extra},
        st.one_of(unicode_text, messages, json_values),
        _optional_fields(["max_output_tokens", "temperature", "top_p", "instructions", "stream", "text", "tools",
                          "previous_response_id", "reasoning", "store"]),
    )  # fmt: skip
    return st.one_of(shaped, shaped, json_values)


def encode_body(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


upload_bytes = st.one_of(
    st.binary(max_size=2048),
    st.just(b"RIFF\x24\x00\x00\x00WAVEfmt "),  # a WAV header cut short
    st.just(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    st.just(b""),
)
FORM_FIELD_NAMES = [
    "model", "language", "prompt", "response_format", "temperature", "stream", "timestamp_granularities[]",
]  # fmt: skip
form_fields = st.dictionaries(
    st.sampled_from(FORM_FIELD_NAMES),
    unicode_text,
    max_size=4,
)  # fmt: skip


def sampling_messages() -> st.SearchStrategy[common_pb2.SamplingParams]:
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    return st.builds(
        common_pb2.SamplingParams,
        temperature=floats,
        top_p=floats,
        top_k=st.integers(0, UINT32_MAX),
        min_p=floats,
        repetition_penalty=floats,
        presence_penalty=floats,
        seed=st.integers(0, UINT64_MAX),
        max_tokens=st.integers(0, UINT32_MAX),
        min_tokens=st.integers(0, UINT32_MAX),
        stop=st.lists(unicode_text, max_size=20),
        stop_token_ids=st.lists(st.integers(0, UINT32_MAX), max_size=4),
        n=st.integers(0, UINT32_MAX),
        logprobs=st.booleans(),
        top_logprobs=st.integers(0, UINT32_MAX),
        logit_bias=st.dictionaries(st.integers(0, UINT32_MAX), floats, max_size=3),
    )


def generate_requests(model: str) -> st.SearchStrategy[generation_pb2.GenerateRequest]:
    token_prompt = st.builds(
        lambda ids: generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=ids)),
        st.lists(st.integers(0, UINT32_MAX), max_size=20),
    )
    text_prompt = st.builds(lambda text: generation_pb2.GenerateRequest(text=text), unicode_text)
    oversize = st.just(generation_pb2.GenerateRequest(text="w5 " * 300_000))

    def finish(request: generation_pb2.GenerateRequest, model_name: str, sampling: common_pb2.SamplingParams) -> Any:
        request.model = model_name
        request.sampling.CopyFrom(sampling)
        return request

    return st.builds(
        finish,
        st.one_of(token_prompt, text_prompt, oversize),
        st.one_of(st.just(model), unicode_text),
        sampling_messages(),
    )


def chat_requests(model: str) -> st.SearchStrategy[generation_pb2.ChatRequest]:
    roles = st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer"]), unicode_text)

    def message(role: str, text: str, image: bytes | None) -> generation_pb2.ChatMessage:
        built = generation_pb2.ChatMessage(role=role)
        built.content.add(text=text)
        if image is not None:
            built.content.add(image=generation_pb2.Image(data=image))
        return built

    def request(conversation: list[Any], model_name: str, sampling: common_pb2.SamplingParams) -> Any:
        return generation_pb2.ChatRequest(model=model_name, messages=conversation, sampling=sampling)

    return st.builds(
        request,
        st.lists(st.builds(message, roles, unicode_text, st.none() | st.binary(max_size=64)), max_size=4),
        st.one_of(st.just(model), unicode_text),
        sampling_messages(),
    )


def transcribe_requests() -> st.SearchStrategy[transcription_pb2.TranscribeRequest]:
    return st.builds(
        transcription_pb2.TranscribeRequest,
        model=st.one_of(st.just("speech"), st.just("tiny"), unicode_text),
        audio=upload_bytes,
        filename=unicode_text,
        language=st.one_of(st.sampled_from(["en", "fr", "xx", ""]), unicode_text),
        prompt=unicode_text,
        temperature=st.floats(width=32),
        task=st.integers(0, 5),
    )


def tokenize_requests(model: str) -> st.SearchStrategy[generation_pb2.TokenizeRequest]:
    return st.one_of(
        st.builds(lambda text, name: generation_pb2.TokenizeRequest(model=name, text=text), unicode_text,
                  st.one_of(st.just(model), unicode_text)),
        st.just(generation_pb2.TokenizeRequest(model=model, text="w1 " * 200_000)),
    )  # fmt: skip
