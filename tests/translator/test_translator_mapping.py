"""Unit tests of the pure mapping functions: OpenAI JSON -> proto and proto -> OpenAI JSON."""

from __future__ import annotations

import base64

import grpc
import pytest
from protoserve.translator.auth import is_authorized
from protoserve.translator.errors import ApiError, api_error_from_grpc
from protoserve.translator.mapping.chat_request import chat_request
from protoserve.translator.mapping.chat_response import ChatChunkBuilder, chat_completion
from protoserve.translator.mapping.common_response import completion_logprobs, finish_reason
from protoserve.translator.mapping.completions import CompletionChunkBuilder, generate_request
from protoserve.translator.mapping.images import ImageBudget
from protoserve.translator.mapping.responses_request import responses_chat_request
from protoserve.translator.mapping.responses_response import ResponseEventBuilder, response_from_result
from protoserve.translator.mapping.transcription import Transcript, srt, vtt
from protoserve.v1 import common_pb2, generation_pb2, transcription_pb2

PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)


def budget(max_images: int = 4, max_bytes: int = 1000) -> ImageBudget:
    return ImageBudget(max_images=max_images, max_image_bytes=max_bytes)


def image_message(url: str, detail: str | None = None) -> dict:
    image = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": image}]}


def test_images_data_urls_are_decoded_and_http_urls_passed() -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    request = chat_request(
        {"messages": [image_message(data_url, "low"), image_message("https://x.test/a.png")]}, "id", budget()
    )
    first, second = request.messages
    assert first.content[0].text == "look"
    assert first.content[1].image.data == PNG and first.content[1].image.detail == "low"
    assert second.content[1].image.url == "https://x.test/a.png"


@pytest.mark.parametrize(
    ("url", "detail", "fragment"),
    [
        ("data:image/png;base64,!!!", None, "not valid base64"),
        ("data:text/plain;base64,aGk=", None, "image/*"),
        ("data:image/png;base64", None, "malformed"),
        ("file:///etc/passwd", None, "http(s)"),
        ("ftp://x/a.png", None, "http(s)"),
        ("https://x/a.png", "huge", "detail"),
        ("data:image/png;base64," + base64.b64encode(bytes(3000)).decode(), None, "larger than"),
    ],
)
def test_bad_images_are_400_naming_the_url(url: str, detail: str | None, fragment: str) -> None:
    with pytest.raises(ApiError) as caught:
        chat_request({"messages": [image_message(url, detail)]}, "id", budget())
    assert caught.value.status == 400 and fragment in caught.value.message
    assert caught.value.param == "messages[0].content[1].image_url.url"


def test_image_count_limit() -> None:
    messages = [image_message("https://x/a.png") for _ in range(3)]
    with pytest.raises(ApiError, match="too many images"):
        chat_request({"messages": messages}, "id", budget(max_images=2))


def test_chat_message_fields() -> None:
    request = chat_request(
        {
            "messages": [
                {"role": "developer", "content": "rules", "name": "boss"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a"}],
                    "reasoning_content": "hmm",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
            "top_k": -1,
            "seed": -1,
            "stop": "x",
            "stop_token_ids": [7],
            "n": 3,
            "logprobs": False,
            "max_tokens": 10,
            "max_completion_tokens": 20,
        },
        "req",
        budget(),
    )
    developer, assistant, tool = request.messages
    assert developer.role == "developer" and developer.name == "boss"
    assert assistant.reasoning_content == "hmm" and assistant.tool_calls[0].function.arguments == '{"x": 1}'
    assert tool.tool_call_id == "c1"
    sampling = request.sampling
    assert not sampling.HasField("top_k") and sampling.seed == 2**64 - 1
    assert list(sampling.stop) == ["x"] and list(sampling.stop_token_ids) == [7] and sampling.n == 3
    assert sampling.max_tokens == 20  # max_completion_tokens wins over max_tokens
    assert not sampling.HasField("temperature") and request.options.request_id == "req"


def test_response_format_variants() -> None:
    base = {"messages": [{"role": "user", "content": "x"}]}
    json_object = chat_request({**base, "response_format": {"type": "json_object"}}, "id", budget())
    assert json_object.sampling.response_format.type == common_pb2.ResponseFormat.TYPE_JSON_OBJECT
    # huggingface_hub sends a json_schema as {"type": "json_object", "value": schema}
    hub = chat_request(
        {**base, "response_format": {"type": "json_object", "value": {"type": "object"}}}, "id", budget()
    )
    assert hub.sampling.response_format.type == common_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ApiError, match="nested"):
        chat_request(
            {**base, "response_format": {"type": "json_schema", "json_schema": {"schema": deep}}}, "id", budget()
        )


def test_completion_prompts() -> None:
    assert generate_request({"prompt": "hi"}, "id").text == "hi"
    assert list(generate_request({"prompt": [[1, 2]]}, "id").token_ids.ids) == [1, 2]
    for prompt in ([], [1, "a"], [{"a": 1}], 5, [-1]):
        with pytest.raises(ApiError):
            generate_request({"prompt": prompt}, "id")
    with pytest.raises(ApiError, match="between 0 and 20"):
        generate_request({"prompt": "x", "logprobs": 50}, "id")


def test_responses_input_items() -> None:
    request = responses_chat_request(
        {
            "instructions": "be nice",
            "input": [
                {"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "reasoning", "summary": []},
            ],
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
            "tool_choice": {"type": "function", "name": "weather"},
        },
        "id",
        budget(),
    )
    roles = [message.role for message in request.messages]
    assert roles == ["system", "user", "assistant", "tool"]
    assert [call.id for call in request.messages[2].tool_calls] == ["c1", "c2"]
    assert request.messages[3].content[0].text == "sunny"
    assert request.sampling.response_format.schema_name == "w"
    assert request.tool_choice.function_name == "weather"
    with pytest.raises(ApiError):
        responses_chat_request({"input": [{"type": "file_search_call"}]}, "id", budget())
    one_output = responses_chat_request({"input": "hi", "n": 3, "stop": ["x"]}, "id", budget())
    assert one_output.sampling.n == 0 and list(one_output.sampling.stop) == ["x"]  # no unseen choices; stop kept


def chunk(*deltas: generation_pb2.ChoiceDelta, with_usage: bool = False) -> generation_pb2.GenerationChunk:
    message = generation_pb2.GenerationChunk(model="m", created=7, choices=list(deltas))
    if with_usage:
        message.usage.CopyFrom(common_pb2.Usage(prompt_tokens=3, completion_tokens=2))
    return message


def test_chat_chunk_builder_sends_role_once_per_choice() -> None:
    builder = ChatChunkBuilder("chatcmpl-1", "asked", include_usage=True, with_logprobs=False)
    first = builder.chunks(chunk(generation_pb2.ChoiceDelta(index=0, text="a"), generation_pb2.ChoiceDelta(index=1)))
    assert [c["choices"][0]["delta"] for c in first] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
        {"role": "assistant", "content": ""},
    ]
    later = builder.chunks(
        chunk(generation_pb2.ChoiceDelta(index=0, reasoning_text="r", finish_reason=common_pb2.FINISH_REASON_LENGTH))
    )
    assert later[0]["choices"][0] == {
        "index": 0,
        "delta": {"reasoning_content": "r"},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert all(c["usage"] is None and c["model"] == "m" and c["created"] == 7 for c in first + later)
    usage = builder.usage_chunk(common_pb2.Usage(prompt_tokens=3, completion_tokens=2))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5


def test_finish_reasons_and_unary_chat() -> None:
    assert [finish_reason(reason, 0) for reason in (0, 1, 2, 3, 4)] == [None, "stop", "length", "tool_calls", "stop"]
    with pytest.raises(ApiError):
        finish_reason(common_pb2.FINISH_REASON_ERROR, 0)
    result = generation_pb2.GenerationResult(choices=[generation_pb2.Choice(index=0, text="t")])
    completion = chat_completion(result, "chatcmpl-x", "asked", with_logprobs=False)
    assert completion["model"] == "asked" and completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_completion_logprob_offsets_and_stream() -> None:
    entries = [common_pb2.TokenLogprob(token="ab", logprob=-1), common_pb2.TokenLogprob(token="c", logprob=-2)]
    assert completion_logprobs(entries, 10)["text_offset"] == [10, 12]
    builder = CompletionChunkBuilder("cmpl-1", "m", include_usage=False, with_logprobs=True)
    first = generation_pb2.ChoiceDelta(index=0, text="ab", logprobs=entries[:1])
    second = generation_pb2.ChoiceDelta(index=0, text="c", logprobs=entries[1:], finish_reason=1)
    out = builder.chunks(chunk(first)) + builder.chunks(chunk(second))
    assert out[1]["choices"][0]["logprobs"]["text_offset"] == [2] and out[1]["choices"][0]["finish_reason"] == "stop"


def test_responses_builder_reasoning_then_text_and_incomplete() -> None:
    builder = ResponseEventBuilder("resp_1", "m", {})
    events = builder.events(
        chunk(
            generation_pb2.ChoiceDelta(index=0, reasoning_text="think"),
            generation_pb2.ChoiceDelta(index=1, text="ignored"),
        )
    )
    events += builder.events(chunk(generation_pb2.ChoiceDelta(index=0, text="out", finish_reason=2), with_usage=True))
    events += builder.finish()
    types = [event["type"] for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_text.delta",
    ]
    assert types.index("response.output_item.done") < types.index("response.output_text.delta")
    assert types[-1] == "response.incomplete" and "response.completed" not in types  # as OpenAI ends a cut-off stream
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert [item["status"] for item in final["output"]] == ["completed", "incomplete"]  # the one cut off
    assert final["output"][1]["content"][0]["text"] == "out"
    assert events[-2]["type"] == "response.output_item.done" and events[-2]["item"]["status"] == "incomplete"
    assert "ignored" not in str(final)
    empty = ResponseEventBuilder("resp_2", "m", {}).finish()
    assert [event["type"] for event in empty] == ["response.created", "response.in_progress", "response.completed"]
    unary = response_from_result(generation_pb2.GenerationResult(), "resp_3", "m", {})
    assert unary["output"] == [] and unary["model"] == "m"


def test_responses_builder_error_uses_no_sequence_numbers() -> None:
    builder = ResponseEventBuilder("resp_5", "m", {})
    events = builder.events(chunk(generation_pb2.ChoiceDelta(index=0, text="a")))
    with pytest.raises(ApiError):
        builder.events(
            chunk(generation_pb2.ChoiceDelta(index=0, text="b", finish_reason=common_pb2.FINISH_REASON_ERROR))
        )
    error = builder.error_event({"error": {"message": "failed", "code": None, "param": None}})
    numbers = [event["sequence_number"] for event in [*events, error]]
    assert numbers == list(range(len(numbers)))


@pytest.mark.parametrize(
    "reason, status", [(common_pb2.FINISH_REASON_STOP, "completed"), (common_pb2.FINISH_REASON_LENGTH, "incomplete")]
)
def test_unary_response_marks_the_item_a_length_finish_cut_off(reason: int, status: str) -> None:
    choice = generation_pb2.Choice(index=0, reasoning_text="r", text="partial", finish_reason=reason)
    unary = response_from_result(generation_pb2.GenerationResult(choices=[choice]), "resp_4", "m", {})
    assert unary["status"] == status
    assert [item["status"] for item in unary["output"]] == ["completed", status]
    assert unary["output"][1]["content"][0]["text"] == "partial"


def test_subtitle_formats() -> None:
    segments = [transcription_pb2.Segment(start=3661.5, end=3662.0, text=" late ")]
    assert srt(segments) == "1\n01:01:01,500 --> 01:01:02,000\nlate\n"
    assert vtt(segments) == "WEBVTT\n\n01:01:01.500 --> 01:01:02.000\nlate\n"
    transcript = Transcript(task="transcribe")
    transcript.add(transcription_pb2.TranscriptionChunk(text_delta="a"))
    transcript.add(transcription_pb2.TranscriptionChunk(text_delta="b", done=True))
    assert transcript.full_text == "ab"  # no final text: the deltas joined


def test_grpc_mapping_and_keys() -> None:
    error = api_error_from_grpc(grpc.StatusCode.DATA_LOSS, "secret detail")
    assert error.status == 500 and "secret" not in error.message and error.body()["error"]["type"] == "server_error"
    limited = api_error_from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after", "bogus"),))
    assert limited.headers == {"Retry-After": "1"}
    keys = [b"k1", b"k2"]
    assert is_authorized("Bearer k2", keys) and is_authorized("bearer k1", keys)
    assert not any(is_authorized(header, keys) for header in (None, "", "Bearer", "Basic k1", "Bearer k3", "k1"))


def test_invalid_argument_names_the_field_the_server_named() -> None:
    named = {
        "sampling.temperature must be in [0.0, 2.0], got 5.0": "temperature",
        "messages[2].content must not be empty": "messages[2].content",
        "messages[3] has no role": "messages[3]",
        "this model's context length is 128 tokens": None,
    }
    for details, param in named.items():
        assert api_error_from_grpc(grpc.StatusCode.INVALID_ARGUMENT, details).param == param
    assert api_error_from_grpc(grpc.StatusCode.NOT_FOUND, "sampling.x unknown").param is None
