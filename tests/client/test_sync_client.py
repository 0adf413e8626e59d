"""The blocking client against the scripted fake server (conftest.py) over real sockets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from client_fakes import FakeServer
from protoserve.client import (
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    ProtoserveClient,
    ProtoserveError,
    Unauthenticated,
    Unavailable,
)
from protoserve.v1 import common_pb2, generation_pb2, transcription_pb2

HELLO = [{"role": "user", "content": "hello"}]


def test_chat_unary_returns_a_reply(fake_server: FakeServer) -> None:
    with ProtoserveClient(fake_server.target) as client:
        reply = client.chat(HELLO, model="fake-model", temperature=0, max_tokens=5, stop="\n")
    assert reply.text == "echo: hello"
    assert reply.finish_reason == "stop"
    assert reply.token_ids == (1, 2, 3)
    assert reply.usage is not None and reply.usage.total_tokens == 7
    sent = fake_server.recorded.last("ChatUnary")
    assert sent.model == "fake-model"
    assert sent.sampling.HasField("temperature") and sent.sampling.temperature == 0
    assert sent.sampling.max_tokens == 5 and list(sent.sampling.stop) == ["\n"]
    assert not sent.sampling.HasField("top_p")  # unset options stay unset: the server's default applies


def test_chat_stream_yields_deltas_with_usage_last(fake_server: FakeServer) -> None:
    with ProtoserveClient(fake_server.target) as client:
        deltas = list(client.chat(HELLO, stream=True, request_id="my-id"))
    assert "".join(delta.text for delta in deltas) == "echo: hello"
    assert [delta.finish_reason for delta in deltas] == [None, None, "stop", None]
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 3
    assert all(delta.usage is None for delta in deltas[:-1])
    assert {delta.request_id for delta in deltas} == {"my-id"}


def test_n_choices_are_returned_in_order(fake_server: FakeServer) -> None:
    with ProtoserveClient(fake_server.target) as client:
        reply = client.chat(HELLO, n=3)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert reply.choices[2].text == "echo: hello #2"


def test_messages_tools_and_formats_reach_the_server(fake_server: FakeServer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                {"type": "image", "data": b"\x89PNG"},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "look", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
        generation_pb2.ChatMessage(role="user", content=[generation_pb2.ContentPart(text="hello")]),
    ]
    tools = [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}}
    with ProtoserveClient(fake_server.target, priority=3) as client:
        client.chat(
            messages,
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "look"}},
            response_format=schema,
            chat_template_kwargs={"enable_thinking": False},
            logit_bias={"42": -100},
            user="someone",
        )
    sent = fake_server.recorded.last("ChatUnary")
    user_parts = sent.messages[1].content
    assert user_parts[1].image.url.startswith("data:image/png") and user_parts[1].image.detail == "low"
    assert user_parts[2].image.data == b"\x89PNG"
    assert sent.messages[2].tool_calls[0].function.arguments == '{"x": 1}'
    assert sent.messages[3].tool_call_id == "c1"
    assert sent.tools[0].function.parameters["type"] == "object"
    assert sent.tool_choice.function_name == "look"
    assert sent.sampling.response_format.type == common_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    assert sent.sampling.response_format.schema_name == "answer"
    assert dict(sent.sampling.logit_bias) == {42: -100.0}
    assert sent.chat_template_kwargs["enable_thinking"] is False
    assert sent.options.priority == 3 and sent.options.user == "someone"


def test_generate_text_and_token_ids(fake_server: FakeServer) -> None:
    with ProtoserveClient(fake_server.target) as client:
        assert client.generate("once upon").text == "more once upon"
        assert fake_server.recorded.last("GenerateUnary").text == "once upon"
        streamed = "".join(delta.text for delta in client.generate([5, 6, 7], stream=True, max_completion_tokens=9))
    assert streamed == "more 5 6 7"
    sent = fake_server.recorded.last("Generate")
    assert list(sent.token_ids.ids) == [5, 6, 7] and sent.sampling.max_tokens == 9


def test_tokenize_models_and_health(fake_server: FakeServer) -> None:
    with ProtoserveClient(fake_server.target) as client:
        assert client.tokenize("a bb ccc").token_ids == (1, 2, 3)
        assert client.tokenize(HELLO).tokens == ("<user>",)
        models = client.models()
        assert [model.id for model in models] == ["fake-model", "fake-whisper"]
        assert models[0].modalities == ("text", "image") and models[1].capabilities == ("transcribe",)
        assert client.model("fake-whisper").modalities == ("audio",)
        with pytest.raises(NotFound, match="not served"):
            client.model("nope")
        assert client.health() is True
        fake_server.set_serving(False)
        assert client.health() is False
        assert client.health("unknown.Service") is False


def test_transcribe_whole_and_streamed(fake_server: FakeServer, tmp_path: Path) -> None:
    audio = tmp_path / "clip.wav"
    audio.write_bytes(b"RIFF fake wav")
    with ProtoserveClient(fake_server.target) as client:
        transcript = client.transcribe(audio, language="de", task="translate")
        pieces = [delta.text_delta for delta in client.transcribe(b"RIFF", stream=True)]
        with pytest.raises(InvalidArgument, match="could not be decoded"):
            client.transcribe(b"not audio")
    assert transcript.text == "Hello world." and transcript.language == "de" and transcript.duration == 3.0
    assert [segment.text for segment in transcript.segments] == ["Hello", " world."]
    assert pieces == ["Hello", " world.", ""]
    sent = [request for name, request in fake_server.recorded.requests if name == "Transcribe"][0]
    assert sent.filename == "clip.wav" and sent.task == transcription_pb2.TranscribeRequest.TASK_TRANSLATE


@pytest.mark.parametrize(
    ("script", "error_type"),
    [
        ("fail:INVALID_ARGUMENT prompt too long: 5000 > 2048", InvalidArgument),
        ("fail:NOT_FOUND no such model", NotFound),
        ("fail:UNAUTHENTICATED bad key", Unauthenticated),
        ("fail:PERMISSION_DENIED not allowed", PermissionDenied),
        ("fail:UNAVAILABLE draining", Unavailable),
        ("fail:INTERNAL boom", InternalError),
        ("fail:DATA_LOSS odd", ProtoserveError),
    ],
)
def test_status_codes_map_to_error_types(
    fake_server: FakeServer, script: str, error_type: type[ProtoserveError]
) -> None:
    with ProtoserveClient(fake_server.target) as client:
        with pytest.raises(error_type) as unary_error:
            client.chat([{"role": "user", "content": script}])
        with pytest.raises(error_type) as stream_error:
            list(client.chat([{"role": "user", "content": script}], stream=True))
    expected_message = script.partition(" ")[2]
    assert unary_error.value.message == expected_message == stream_error.value.message
    assert unary_error.value.code.name == script[len("fail:") :].partition(" ")[0]


def test_overloaded_carries_retry_after(fake_server: FakeServer) -> None:
    with ProtoserveClient(fake_server.target) as client:
        with pytest.raises(Overloaded) as caught:
            client.chat([{"role": "user", "content": "fail:RESOURCE_EXHAUSTED queue full"}])
    assert caught.value.retry_after == 2.5
    assert "RESOURCE_EXHAUSTED: queue full" == str(caught.value)


def test_error_after_streaming_started(fake_server: FakeServer) -> None:
    received: list[str] = []
    with ProtoserveClient(fake_server.target) as client, pytest.raises(InternalError, match="engine failed"):
        for delta in client.chat([{"role": "user", "content": "fail-midstream"}], stream=True):
            received.append(delta.text)
    assert received == ["echo: "]


def test_deadline_exceeded(fake_server: FakeServer) -> None:
    started = time.monotonic()
    with ProtoserveClient(fake_server.target, timeout=0.3) as client:
        with pytest.raises(DeadlineExceeded):
            client.chat([{"role": "user", "content": "slow"}])
        with pytest.raises(DeadlineExceeded):
            list(client.chat([{"role": "user", "content": "slow"}], stream=True, timeout=0.2))
    assert time.monotonic() - started < 3


def test_api_key_is_sent_as_bearer(fake_server: FakeServer) -> None:
    with ProtoserveClient(fake_server.target, api_key="secret-key") as client:
        client.chat(HELLO)
        list(client.chat(HELLO, stream=True))
    assert [metadata.get("authorization") for metadata in fake_server.recorded.metadata] == ["Bearer secret-key"] * 2
    with ProtoserveClient(fake_server.target) as client:
        client.chat(HELLO)
    assert "authorization" not in fake_server.recorded.metadata[-1]


def test_leaving_a_stream_early_cancels_it(fake_server: FakeServer) -> None:
    with ProtoserveClient(fake_server.target) as client:
        stream = client.chat([{"role": "user", "content": "drip"}], stream=True)
        next(stream)
        stream.close()
    deadline = time.monotonic() + 2
    while not fake_server.recorded.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake_server.recorded.cancelled == ["Chat"]


def test_unix_socket(unix_fake_server: FakeServer) -> None:
    with ProtoserveClient(unix_fake_server.target) as client:
        assert client.chat(HELLO).text == "echo: hello"
        assert "".join(delta.text for delta in client.chat(HELLO, stream=True)) == "echo: hello"
        assert client.health()


def test_unreachable_server() -> None:
    with ProtoserveClient("unix:/tmp/protoserve-no-such-socket.sock", timeout=2) as client:
        assert client.health(timeout=0.5) is False
        with pytest.raises(Unavailable):
            client.chat(HELLO)
