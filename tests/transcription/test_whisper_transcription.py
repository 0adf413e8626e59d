"""SpeechModel on a tiny random whisper: windows, events, options, threads, cancellation, loading."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from protoserve.server.engine.errors import InvalidRequestError, UnsupportedModelError
from protoserve.server.transcription import speech_model as speech_model_module
from protoserve.server.transcription.contract import DoneEvent, SegmentEvent, TranscribeOptions
from protoserve.server.transcription.speech_model import SpeechModel, load_speech_model
from protoserve.server.transcription.whisper_fallback import NO_FALLBACK

# One decode per window: the tests of window mechanics below count decodes. Fallback has its own tests.
ONE_DECODE = TranscribeOptions(fallback=NO_FALLBACK)


@pytest.fixture(scope="module")
def english_model(tiny_whisper_english: Path) -> SpeechModel:
    return load_speech_model(tiny_whisper_english, device="cpu")


@pytest.fixture(scope="module")
def multilingual_model(tiny_whisper_multilingual: Path) -> SpeechModel:
    return load_speech_model(tiny_whisper_multilingual, device="cpu")


@pytest.fixture(scope="module")
def long_speech(speech_folder: Path) -> bytes:
    """The fox sentence repeated to about 65 seconds: three windows or more."""
    import subprocess

    long_path = speech_folder / "long.wav"
    if not long_path.exists():
        wav = str(speech_folder / "fox.wav")
        subprocess.run(["sox", *[wav] * 24, str(long_path)], check=True, capture_output=True)
    return long_path.read_bytes()


async def _collect(model: SpeechModel, audio: bytes, options: TranscribeOptions) -> list[Any]:
    return [event async for event in model.transcribe(audio, options)]


def test_model_description(english_model: SpeechModel, multilingual_model: SpeechModel) -> None:
    assert english_model.architecture == "WhisperForConditionalGeneration"
    assert english_model.dtype == "float32"
    assert english_model.device == "cpu"
    assert english_model.context_length == 64
    assert english_model.created > 0
    assert english_model.model_id.startswith("whisper-en")
    assert not english_model.multilingual
    assert multilingual_model.multilingual


async def test_long_audio_streams_segments_from_several_windows(english_model: SpeechModel, long_speech: bytes) -> None:
    events = await _collect(english_model, long_speech, TranscribeOptions())
    assert isinstance(events[-1], DoneEvent)
    assert all(isinstance(event, SegmentEvent) for event in events[:-1])
    segments = [segment for event in events[:-1] for segment in event.segments]
    assert [segment.id for segment in segments] == list(range(len(segments)))
    starts = [segment.start for segment in segments]
    assert starts == sorted(starts)
    assert all(segment.start <= segment.end for segment in segments)
    assert max(starts) >= 30.0 and min(starts) < 30.0  # more than one window
    assert len(events) - 1 >= 2
    done = events[-1]
    assert done.language == "en"
    assert done.duration == pytest.approx(65, abs=5)
    assert done.text == "".join(segment.text for segment in segments).strip()
    assert all(segment.token_ids and segment.avg_logprob <= 0 for segment in segments)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TranscribeOptions(language="de"), "English-only"),
        (TranscribeOptions(task="translate"), "cannot translate"),
        (TranscribeOptions(temperature=-1), "temperature"),
        (TranscribeOptions(task="summarize"), "task"),  # type: ignore[arg-type]
        (TranscribeOptions(language="klingon"), "unknown language"),
    ],
)
async def test_bad_options_fail_before_any_event(
    english_model: SpeechModel, fox_wav: bytes, options: TranscribeOptions, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        await _collect(english_model, fox_wav, options)


async def test_english_model_accepts_english_by_name(english_model: SpeechModel, fox_wav: bytes) -> None:
    events = await _collect(english_model, fox_wav, TranscribeOptions(language="English"))
    assert events[-1].language == "en"


async def test_garbage_and_too_long_audio_are_invalid_requests(english_model: SpeechModel, fox_wav: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="not audio"):
        await _collect(english_model, b"garbage bytes, not audio" * 20, TranscribeOptions())
    with pytest.raises(InvalidRequestError, match="limit of 1 seconds"):
        await _collect(english_model, fox_wav, TranscribeOptions(max_seconds=1))


async def test_multilingual_detects_or_takes_the_language(multilingual_model: SpeechModel, fox_wav: bytes) -> None:
    detected = (await _collect(multilingual_model, fox_wav, TranscribeOptions()))[-1]
    assert detected.language in multilingual_model.tokens.language_ids
    given = (await _collect(multilingual_model, fox_wav, TranscribeOptions(language="german", task="translate")))[-1]
    assert given.language == "de"


def _record_prefixes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], str]]:
    """Wrap decode_window to record each window's decoder prefix and the thread it ran on."""
    calls: list[tuple[list[int], str]] = []
    original: Callable[..., Any] = speech_model_module.decode_window

    def recording(model: Any, encoder_outputs: Any, prefix: list[int], *args: Any, **kwargs: Any) -> Any:
        calls.append((list(prefix), threading.current_thread().name))
        return original(model, encoder_outputs, prefix, *args, **kwargs)

    monkeypatch.setattr(speech_model_module, "decode_window", recording)
    return calls


async def test_prompt_goes_in_as_previous_text_and_work_runs_off_the_loop(
    english_model: SpeechModel, fox_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_prefixes(monkeypatch)
    await _collect(english_model, fox_wav, TranscribeOptions(prompt="Foxes!"))
    prefix, thread_name = calls[0]
    tokens = english_model.tokens
    prompt_ids = english_model.tokenizer.encode(" Foxes!", add_special_tokens=False)
    assert prefix == [tokens.start_of_previous, *prompt_ids, tokens.start_of_transcript]
    assert thread_name != threading.main_thread().name


async def test_multilingual_prefix_names_language_and_task(
    multilingual_model: SpeechModel, fox_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_prefixes(monkeypatch)
    await _collect(multilingual_model, fox_wav, TranscribeOptions(language="fr", task="translate"))
    tokens = multilingual_model.tokens
    assert calls[0][0] == [tokens.start_of_transcript, tokens.language_ids["fr"], tokens.translate]


async def test_temperature_samples(english_model: SpeechModel, fox_wav: bytes) -> None:
    greedy = [await _collect(english_model, fox_wav, ONE_DECODE) for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = await _collect(english_model, fox_wav, TranscribeOptions(temperature=1.0, fallback=NO_FALLBACK))
    assert sampled[-1].text != greedy[0][-1].text


async def test_stopping_iteration_stops_after_the_current_window(
    english_model: SpeechModel, long_speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_prefixes(monkeypatch)
    stream = english_model.transcribe(long_speech, ONE_DECODE)
    first = await anext(stream)
    assert isinstance(first, SegmentEvent)
    await stream.aclose()
    await asyncio.sleep(0.2)
    assert len(calls) == 1


async def test_cancelled_consumer_stops_after_the_current_window(
    english_model: SpeechModel, long_speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_prefixes(monkeypatch)

    async def consume() -> None:
        async for _event in english_model.transcribe(long_speech, ONE_DECODE):
            pass

    task = asyncio.create_task(consume())
    while not calls:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)
    assert len(calls) == 1
    assert english_model._lock.acquire(timeout=5)  # the window in flight finished and let go
    english_model._lock.release()


def test_loading_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_speech_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        load_speech_model(tmp_path)


def test_bad_dtype_and_device_are_refused(tiny_whisper_english: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_speech_model(tiny_whisper_english, dtype="float8")
    with pytest.raises(ValueError, match="device"):
        load_speech_model(tiny_whisper_english, device="tpu:7")


def test_silence_is_not_an_error(english_model: SpeechModel, encode_audio: Callable[..., bytes]) -> None:
    audio = encode_audio(np.zeros(16_000, dtype=np.float32))
    events = asyncio.run(_collect(english_model, audio, TranscribeOptions()))
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].duration == pytest.approx(1.0, abs=0.01)


async def test_suppressed_tokens_are_never_generated(tiny_whisper_english: Path, fox_wav: bytes) -> None:
    model = load_speech_model(tiny_whisper_english, device="cpu")
    assert model.suppressed_tokens == ()  # the tiny model's generation config names none
    letter_a = model.tokenizer.convert_tokens_to_ids("A")
    model.suppressed_tokens = tuple(token for token in range(model.tokens.end_of_text) if token != letter_a)
    done = (await _collect(model, fox_wav, TranscribeOptions()))[-1]
    assert set(done.text) <= {"A"}


async def test_concurrent_requests_share_the_model_one_window_at_a_time(
    english_model: SpeechModel, fox_wav: bytes, long_speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = [await _collect(english_model, audio, ONE_DECODE) for audio in (fox_wav, long_speech)]
    active = 0
    most_active = 0
    original: Callable[..., Any] = speech_model_module.decode_window

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal active, most_active
        active += 1
        most_active = max(most_active, active)
        try:
            return original(*args, **kwargs)
        finally:
            active -= 1

    monkeypatch.setattr(speech_model_module, "decode_window", counting)
    together = await asyncio.gather(
        _collect(english_model, fox_wav, ONE_DECODE),
        _collect(english_model, long_speech, ONE_DECODE),
    )
    assert list(together) == alone
    assert most_active == 1


async def test_windows_run_on_the_models_compute_thread_with_the_reserved_threads(
    tiny_whisper_english: Path, fox_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from protoserve.server.engine import compute_threads

    before = torch.get_num_threads()
    seen: list[tuple[str, int]] = []
    original: Callable[..., Any] = speech_model_module.decode_window

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return original(*args, **kwargs)

    monkeypatch.setattr(speech_model_module, "decode_window", recording)
    try:
        compute_threads.reserve(2)
        model = load_speech_model(tiny_whisper_english, device="cpu")
        await _collect(model, fox_wav, ONE_DECODE)
        await _collect(model, fox_wav, ONE_DECODE)
        model.close()
        with pytest.raises(RuntimeError):  # closed: no more windows are taken
            await _collect(model, fox_wav, ONE_DECODE)
    finally:
        compute_threads.release()
        torch.set_num_threads(before)
    assert len(seen) == 2
    assert {name for name, _ in seen} == {seen[0][0]} and seen[0][0].startswith("protoserve-speech-")
    assert all(threads == 2 for _, threads in seen)
