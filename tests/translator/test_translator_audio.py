"""Audio transcription and translation uploads through the openai SDK and raw multipart requests."""

from __future__ import annotations

import aiohttp
import grpc
import openai
import pytest
from fake_upstream import FakeUpstream, ScriptedError, running_translator
from protoserve.translator.server import RunningTranslator
from protoserve.v1.transcription_pb2 import TranscribeRequest

AUDIO = b"RIFF" + bytes(100)


def client_for(translator: RunningTranslator) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{translator.url}/v1", api_key="unused", max_retries=0)


async def test_json_transcription_maps_the_form(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    result = await client_for(translator).audio.transcriptions.create(
        model="whisper",
        file=("speech.wav", AUDIO),
        language="en",
        prompt="Star Wars",
        temperature=0.2,
    )
    assert result.text == " Hello there. General Kenobi."
    (request,) = upstream.requests_of("Transcribe")
    assert request.audio == AUDIO and request.filename == "speech.wav" and request.model == "whisper"
    assert request.language == "en" and request.prompt == "Star Wars" and abs(request.temperature - 0.2) < 1e-6
    assert request.task == TranscribeRequest.TASK_TRANSCRIBE


async def test_text_srt_vtt_and_verbose_json(translator: RunningTranslator) -> None:
    client = client_for(translator)
    text = await client.audio.transcriptions.create(model="w", file=("a.wav", AUDIO), response_format="text")
    assert text.strip() == "Hello there. General Kenobi."
    srt = await client.audio.transcriptions.create(model="w", file=("a.wav", AUDIO), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 00:00:03,250\n")
    vtt = await client.audio.transcriptions.create(model="w", file=("a.wav", AUDIO), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n")
    verbose = await client.audio.transcriptions.create(model="w", file=("a.wav", AUDIO), response_format="verbose_json")
    assert verbose.language == "en" and verbose.duration == 3.25
    assert [segment.text for segment in verbose.segments] == [" Hello there.", " General Kenobi."]
    assert verbose.segments[1].start == 1.5


async def test_streamed_transcription_events(translator: RunningTranslator) -> None:
    stream = await client_for(translator).audio.transcriptions.create(model="w", file=("a.wav", AUDIO), stream=True)
    events = [event async for event in stream]
    assert [event.type for event in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]
    assert "".join(event.delta for event in events[:2]) == events[-1].text


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations deprecated
async def test_translation_sets_the_task(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    result = await client_for(translator).audio.translations.create(model="w", file=("a.wav", AUDIO))
    assert result.text.strip().startswith("Hello")
    assert upstream.requests_of("Transcribe")[0].task == TranscribeRequest.TASK_TRANSLATE


async def test_bad_uploads(translator: RunningTranslator, upstream: FakeUpstream, http) -> None:
    url = f"{translator.url}/v1/audio/transcriptions"
    cases = [
        ({"model": "w"}, "file"),
        ({"file": b"", "model": "w"}, "file"),
        ({"file": AUDIO, "response_format": "mp3"}, "response_format"),
        ({"file": AUDIO, "temperature": "warm"}, "temperature"),
        ({"file": AUDIO, "stream": "maybe"}, "stream"),
    ]
    for fields, param in cases:
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in fields.items():
            if isinstance(value, bytes):
                form.add_field(name, value, filename="a.wav", content_type="audio/wav")
            else:
                form.add_field(name, value)
        async with http.post(url, data=form) as response:
            assert response.status == 400, fields
            assert (await response.json())["error"]["param"] == param
    assert upstream.requests_of("Transcribe") == []
    upstream.error = ScriptedError(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode audio")
    with pytest.raises(openai.BadRequestError, match="cannot decode audio"):
        await client_for(translator).audio.transcriptions.create(model="w", file=("a.wav", AUDIO))


async def test_audio_over_the_limit_is_413(upstream: FakeUpstream, http) -> None:
    async with running_translator(upstream, max_audio_bytes=1000) as translator:
        form = aiohttp.FormData()
        form.add_field("file", bytes(5000), filename="a.wav", content_type="audio/wav")
        async with http.post(f"{translator.url}/v1/audio/transcriptions", data=form) as response:
            assert response.status == 413
    assert upstream.requests == []
