"""The asyncio client against the scripted fake server (conftest.py) over real sockets."""

from __future__ import annotations

import asyncio
import time

import pytest
from client_fakes import FakeServer
from protoserve.client import (
    AsyncProtoserveClient,
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NotFound,
    Overloaded,
    ProtoserveError,
    Unauthenticated,
    Unavailable,
)

HELLO = [{"role": "user", "content": "hello"}]


async def test_chat_unary_and_stream(fake_server: FakeServer) -> None:
    async with AsyncProtoserveClient(fake_server.target) as client:
        reply = await client.chat(HELLO, max_tokens=4)
        deltas = [delta async for delta in client.chat(HELLO, stream=True)]
        awaited_stream = await client.chat(HELLO, stream=True)  # awaiting a stream gives the stream
        awaited_text = "".join([delta.text async for delta in awaited_stream])
    assert reply.text == "echo: hello" and reply.finish_reason == "stop"
    assert "".join(delta.text for delta in deltas) == "echo: hello" == awaited_text
    assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == 4


async def test_generate_tokenize_models_health_transcribe(fake_server: FakeServer) -> None:
    async with AsyncProtoserveClient(fake_server.target) as client:
        assert (await client.generate([1, 2])).text == "more 1 2"
        assert "".join([delta.text async for delta in client.generate("abc", stream=True)]) == "more abc"
        assert (await client.tokenize("x yy")).token_ids == (1, 2)
        assert [model.id for model in await client.models()] == ["fake-model", "fake-whisper"]
        assert (await client.model("fake-model")).context_length == 2048
        assert await client.health() is True
        transcript = await client.transcribe(b"RIFF")
        pieces = [delta.text_delta async for delta in client.transcribe(b"RIFF", stream=True)]
    assert transcript.text == "Hello world." and len(transcript.segments) == 2
    assert pieces == ["Hello", " world.", ""]


@pytest.mark.parametrize(
    ("script", "error_type"),
    [
        ("fail:INVALID_ARGUMENT too long", InvalidArgument),
        ("fail:NOT_FOUND no model", NotFound),
        ("fail:UNAUTHENTICATED bad key", Unauthenticated),
        ("fail:UNAVAILABLE draining", Unavailable),
    ],
)
async def test_status_codes_map_to_error_types(
    fake_server: FakeServer, script: str, error_type: type[ProtoserveError]
) -> None:
    async with AsyncProtoserveClient(fake_server.target) as client:
        with pytest.raises(error_type):
            await client.chat([{"role": "user", "content": script}])
        with pytest.raises(error_type):
            async for _ in client.chat([{"role": "user", "content": script}], stream=True):
                pass
        with pytest.raises(NotFound):
            await client.model("missing")


async def test_overloaded_retry_after_and_midstream_error(fake_server: FakeServer) -> None:
    async with AsyncProtoserveClient(fake_server.target) as client:
        with pytest.raises(Overloaded) as caught:
            await client.chat([{"role": "user", "content": "fail:RESOURCE_EXHAUSTED full"}])
        assert caught.value.retry_after == 2.5
        received: list[str] = []
        with pytest.raises(InternalError):
            async for delta in client.chat([{"role": "user", "content": "fail-midstream"}], stream=True):
                received.append(delta.text)
        assert received == ["echo: "]


async def test_deadline_and_api_key(fake_server: FakeServer) -> None:
    started = time.monotonic()
    async with AsyncProtoserveClient(fake_server.target, api_key="k1", timeout=0.3) as client:
        with pytest.raises(DeadlineExceeded):
            await client.chat([{"role": "user", "content": "slow"}])
        with pytest.raises(DeadlineExceeded):
            async for _ in client.chat([{"role": "user", "content": "slow"}], stream=True, timeout=0.2):
                pass
    assert time.monotonic() - started < 3
    assert {metadata["authorization"] for metadata in fake_server.recorded.metadata} == {"Bearer k1"}


async def test_closing_or_cancelling_a_stream_cancels_the_call(fake_server: FakeServer) -> None:
    drip = [{"role": "user", "content": "drip"}]
    async with AsyncProtoserveClient(fake_server.target) as client:
        stream = client.chat(drip, stream=True)
        assert (await stream.__anext__()).text == "ech"  # "echo: drip" in three pieces
        await stream.aclose()

        async def consume() -> None:
            async for _ in client.chat(drip, stream=True):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if len(fake_server.recorded.cancelled) == 2:
                break
            await asyncio.sleep(0.02)
    assert fake_server.recorded.cancelled == ["Chat", "Chat"]


async def test_a_call_cancelled_from_elsewhere_raises_cancelled_not_cancelled_error(fake_server: FakeServer) -> None:
    """The reading task was not cancelled: it must end with an error (as the sync client's), not as cancelled."""
    async with AsyncProtoserveClient(fake_server.target) as client:
        stream = client.chat([{"role": "user", "content": "drip"}], stream=True)

        async def read_all() -> list[str]:
            return [delta.text async for delta in stream]

        reader = asyncio.create_task(read_all())
        await asyncio.sleep(0.3)  # the first piece came; the reader waits for the next
        stream.cancel()
        with pytest.raises(Cancelled):
            await reader
        assert not reader.cancelled()

    for closing_while in ("streaming", "unary"):
        client = AsyncProtoserveClient(fake_server.target)
        if closing_while == "streaming":
            stream = client.chat([{"role": "user", "content": "drip"}], stream=True)
            call = asyncio.create_task(read_all())
        else:
            call = asyncio.create_task(client.chat([{"role": "user", "content": "slow"}]))
        await asyncio.sleep(0.3)
        await client.close()
        with pytest.raises(ProtoserveError):  # Cancelled or Unavailable, depending on how the channel went
            await call
        assert not call.cancelled(), closing_while


async def test_bad_arguments_raise_before_sending(fake_server: FakeServer) -> None:
    async with AsyncProtoserveClient(fake_server.target) as client:
        with pytest.raises(InvalidArgument, match="temprature"):
            client.chat(HELLO, temprature=0.5)
        with pytest.raises(InvalidArgument, match="timeout"):
            client.chat(HELLO, stream=True, timeout=-1)
        with pytest.raises(InvalidArgument, match="audio"):
            client.transcribe("clip.wav")
    assert fake_server.recorded.requests == []


async def test_unix_socket(unix_fake_server: FakeServer) -> None:
    async with AsyncProtoserveClient(unix_fake_server.target) as client:
        assert (await client.chat(HELLO)).text == "echo: hello"
        assert await client.health()
