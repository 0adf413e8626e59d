"""TranscriptionService: streaming shape, limits checked before decoding, errors mapped."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.limits import RequestLimits
from protoserve.v1 import common_pb2, transcription_pb2, transcription_pb2_grpc

from .runtime_fakes import FakeSpeechModel, generation_model, running_server, speech_model, target

Request = transcription_pb2.TranscribeRequest


async def _transcribe(running, request: Request) -> list[transcription_pb2.TranscriptionChunk]:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(target(running)) as channel:
        stub = transcription_pb2_grpc.TranscriptionServiceStub(channel)
        call = stub.Transcribe(request, timeout=5)
        chunks = []
        while (chunk := await call.read()) is not grpc.aio.EOF:
            chunks.append(chunk)
        return chunks


async def test_segments_stream_then_done() -> None:
    speech = FakeSpeechModel(windows=2)
    async with running_server([generation_model("tiny"), speech_model("whisper", speech)], warm_up=False) as running:
        request = Request(
            audio=b"fake audio",
            filename="clip.wav",
            language="EN",
            prompt="Names: Ada.",
            temperature=0.2,
            task=Request.TASK_TRANSCRIBE,
            options=common_pb2.RequestOptions(request_id="tr-1"),
        )
        chunks = await _transcribe(running, request)
    assert [chunk.text_delta for chunk in chunks[:-1]] == [" part 0.", " part 1."]
    assert chunks[0].segments[0].end == pytest.approx(2.5) and list(chunks[0].segments[0].token_ids) == [1, 2]
    last = chunks[-1]
    assert last.done and last.text == "part 0. part 1." and last.language == "en" and last.duration == 3.0
    assert {chunk.request_id for chunk in chunks} == {"tr-1"} and {chunk.model for chunk in chunks} == {"whisper"}
    audio, options = speech.calls[0]
    assert audio == b"fake audio"
    assert (options.language, options.prompt, options.task, options.filename) == (
        "en",
        "Names: Ada.",
        "transcribe",
        "clip.wav",
    )
    assert options.temperature == pytest.approx(0.2)


async def test_request_id_is_made_when_missing() -> None:
    async with running_server([speech_model("whisper")], warm_up=False) as running:
        chunks = await _transcribe(running, Request(audio=b"x"))
    assert chunks[0].request_id.startswith("req-") and len({chunk.request_id for chunk in chunks}) == 1


@pytest.mark.parametrize(
    ("request_message", "message_part"),
    [
        (Request(audio=b""), "audio is empty"),
        (Request(audio=b"x" * 101), "audio is 101 bytes; this server accepts at most 100"),
        (Request(audio=b"x", language="english!"), "ISO-639-1"),
        (Request(audio=b"x", temperature=1.5), "temperature"),
        (Request(audio=b"x", temperature=float("nan")), "temperature"),
        (Request(audio=b"x", task=7), "task 7"),  # type: ignore[arg-type]
        (Request(audio=b"x", prompt="p" * 5000), "prompt is 5000 characters"),
    ],
)
async def test_bad_requests_are_refused_before_the_model_runs(request_message: Request, message_part: str) -> None:
    speech = FakeSpeechModel()
    limits = RequestLimits(max_audio_bytes=100)
    async with running_server([speech_model("whisper", speech)], limits=limits, warm_up=False) as running:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _transcribe(running, request_message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message_part in (caught.value.details() or "")
    assert speech.calls == []


async def test_model_errors_are_mapped() -> None:
    speech = FakeSpeechModel(error=InvalidRequestError("the audio could not be decoded: not an audio file"))
    async with running_server([generation_model("tiny"), speech_model("whisper", speech)], warm_up=False) as running:
        with pytest.raises(grpc.aio.AioRpcError) as undecodable:
            await _transcribe(running, Request(audio=b"garbage"))
        assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be decoded" in (undecodable.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _transcribe(running, Request(audio=b"x", model="whisper-large"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as wrong_kind:
            await _transcribe(running, Request(audio=b"x", model="tiny"))
        assert wrong_kind.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a speech model; call GenerationService" in (wrong_kind.value.details() or "")


async def test_no_speech_model_is_not_found() -> None:
    async with running_server([generation_model("tiny")], warm_up=False) as running:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _transcribe(running, Request(audio=b"x"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no default speech model" in (caught.value.details() or "")


async def test_cancelling_the_call_stops_the_model() -> None:
    speech = FakeSpeechModel(windows=100, window_delay=0.05)
    async with running_server([speech_model("whisper", speech)], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            call = transcription_pb2_grpc.TranscriptionServiceStub(channel).Transcribe(Request(audio=b"x"))
            await call.read()
            call.cancel()
            for _ in range(50):
                if speech.closed_early:
                    break
                await asyncio.sleep(0.02)
    assert speech.closed_early


async def test_uploads_past_grpc_default_4_mib_are_accepted() -> None:
    speech = FakeSpeechModel(windows=1)
    async with running_server([speech_model("whisper", speech)], warm_up=False) as running:
        chunks = await _transcribe(running, Request(audio=b"\x01" * (6 * 1024 * 1024)))
    assert chunks[-1].done and len(speech.calls[0][0]) == 6 * 1024 * 1024
