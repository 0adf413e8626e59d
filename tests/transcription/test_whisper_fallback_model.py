"""Fallback, silence and seeded sampling through SpeechModel, on a tiny random whisper.

Random weights are never confident (mean log-probability far below -1), so with the default policy
every window runs the whole temperature schedule; thresholds given through the options force the
other paths.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from protoserve.server.transcription import speech_model as speech_model_module
from protoserve.server.transcription.contract import DoneEvent, SegmentEvent, TranscribeOptions
from protoserve.server.transcription.speech_model import SpeechModel, load_speech_model, request_seed
from protoserve.server.transcription.whisper_decoding import DecodedWindow, decode_window
from protoserve.server.transcription.whisper_fallback import NO_FALLBACK, FallbackPolicy


@pytest.fixture(scope="module")
def english_model(tiny_whisper_english: Path) -> SpeechModel:
    return load_speech_model(tiny_whisper_english, device="cpu")


@pytest.fixture(scope="module")
def long_speech(speech_folder: Path) -> bytes:
    """The fox sentence repeated to about 65 seconds: three windows."""
    long_path = speech_folder / "long-fallback.wav"
    if not long_path.exists():
        wav = str(speech_folder / "fox.wav")
        subprocess.run(["sox", *[wav] * 24, str(long_path)], check=True, capture_output=True)
    return long_path.read_bytes()


async def _collect(model: SpeechModel, audio: bytes, options: TranscribeOptions) -> list[Any]:
    return [event async for event in model.transcribe(audio, options)]


def _record_decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, DecodedWindow]]:
    """Wrap decode_window to record each decode's temperature and result."""
    decodes: list[tuple[float, DecodedWindow]] = []
    original: Callable[..., DecodedWindow] = speech_model_module.decode_window

    def recording(*args: Any, **kwargs: Any) -> DecodedWindow:
        result = original(*args, **kwargs)
        decodes.append((kwargs["temperature"], result))
        return result

    monkeypatch.setattr(speech_model_module, "decode_window", recording)
    return decodes


def _per_window(decodes: list[tuple[float, DecodedWindow]], schedule: list[float]) -> bool:
    """Whether the decodes ran `schedule` in full for each window (one window or more)."""
    temperatures = [temperature for temperature, _ in decodes]
    windows = len(temperatures) // len(schedule)
    return windows >= 1 and temperatures == schedule * windows


def _segments(events: list[Any]) -> list[Any]:
    return [segment for event in events if isinstance(event, SegmentEvent) for segment in event.segments]


def _is_slice_of(part: tuple[int, ...], whole: tuple[int, ...]) -> bool:
    return any(whole[start : start + len(part)] == part for start in range(len(whole) - len(part) + 1))


async def test_an_unsure_window_runs_the_schedule_and_keeps_the_last_decode(
    english_model: SpeechModel, fox_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _record_decodes(monkeypatch)
    events = await _collect(english_model, fox_wav, TranscribeOptions())
    schedule = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert _per_window(decodes, schedule)
    assert all(decoded.avg_logprob < -1.0 for _, decoded in decodes)
    kept = decodes[len(schedule) - 1][1]  # the first window's decode at 1.0
    first_window = events[0]
    assert isinstance(first_window, SegmentEvent), "the random model writes something for the fox"
    assert all(_is_slice_of(segment.token_ids, kept.token_ids) for segment in first_window.segments)
    assert isinstance(events[-1], DoneEvent)


async def test_thresholds_from_the_options_accept_the_first_decode(
    english_model: SpeechModel, fox_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _record_decodes(monkeypatch)
    lenient = FallbackPolicy(compression_ratio_threshold=1e9, logprob_threshold=-1e9)
    events = await _collect(english_model, fox_wav, TranscribeOptions(fallback=lenient))
    assert [temperature for temperature, _ in decodes] == [0.0]
    assert _segments(events)


async def test_the_callers_temperature_starts_the_schedule(
    english_model: SpeechModel, fox_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _record_decodes(monkeypatch)
    await _collect(english_model, fox_wav, TranscribeOptions(temperature=0.5))
    assert _per_window(decodes, [0.5, 0.7, 0.9])


async def test_silent_windows_give_no_segment_and_are_skipped_whole(
    english_model: SpeechModel, long_speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _record_decodes(monkeypatch)
    everything_is_silent = FallbackPolicy(no_speech_threshold=0.0)  # and random decodes are far below -1
    events = await _collect(english_model, long_speech, TranscribeOptions(fallback=everything_is_silent))
    assert len(events) == 1 and isinstance(events[0], DoneEvent)
    assert events[0].text == "" and events[0].duration == pytest.approx(65, abs=5)
    assert [temperature for temperature, _ in decodes] == [0.0, 0.0, 0.0]  # three windows, never retried


async def test_no_speech_probability_is_read_at_the_start_of_transcript(english_model: SpeechModel) -> None:
    tokens = english_model.tokens
    assert tokens.no_speech == english_model.tokenizer.convert_tokens_to_ids("<|nocaptions|>")
    torch.manual_seed(1)
    features = torch.randn(1, 80, 3000)
    prefix = [tokens.start_of_previous, 72, 73, tokens.start_of_transcript]
    with torch.inference_mode():
        encoder_outputs = english_model.model.get_encoder()(features)
        logits = english_model.model(encoder_outputs=encoder_outputs, decoder_input_ids=torch.tensor([prefix])).logits
    expected = float(torch.softmax(logits[0, 3], dim=-1)[tokens.no_speech])

    def decode(window_tokens: Any) -> DecodedWindow:
        return decode_window(
            english_model.model, encoder_outputs, prefix, window_tokens,
            window_s=30.0, max_new_tokens=3, temperature=0.0, generator=None,
        )  # fmt: skip

    assert decode(tokens).no_speech_probability == pytest.approx(expected, rel=1e-4)
    assert 0.0 < expected < 1.0
    assert decode(replace(tokens, no_speech=None)).no_speech_probability == 0.0  # a tokenizer without the token


async def test_a_vanishing_temperature_decodes_greedily(english_model: SpeechModel, fox_wav: bytes) -> None:
    """Logits divided by 1e-40 overflow float32 (softmax all NaN, multinomial fails): it is greedy."""
    options = TranscribeOptions(fallback=NO_FALLBACK)
    greedy = await _collect(english_model, fox_wav, options)
    vanishing = await _collect(english_model, fox_wav, replace(options, temperature=1e-40))
    assert [segment.text for segment in _segments(vanishing)] == [segment.text for segment in _segments(greedy)]


def test_request_seed_depends_on_the_audio_and_every_option(fox_wav: bytes) -> None:
    options = TranscribeOptions(temperature=0.7)
    seed = request_seed(fox_wav, options)
    assert seed == request_seed(bytes(fox_wav), TranscribeOptions(temperature=0.7))
    assert 0 <= seed < 2**63
    others = {
        request_seed(fox_wav + b"\x00", options),
        request_seed(fox_wav, replace(options, temperature=0.8)),
        request_seed(fox_wav, replace(options, filename="fox.wav")),
        request_seed(fox_wav, replace(options, fallback=NO_FALLBACK)),
        request_seed(b"", options),
    }
    assert seed not in others and len(others) == 5


async def test_sampling_is_reproducible_per_request(english_model: SpeechModel, fox_wav: bytes) -> None:
    options = TranscribeOptions(temperature=1.0, fallback=NO_FALLBACK)
    torch.manual_seed(123)  # the global generator plays no part
    first = await _collect(english_model, fox_wav, options)
    torch.manual_seed(456)
    second = await _collect(english_model, fox_wav, options)
    assert first == second
    renamed = await _collect(english_model, fox_wav, replace(options, filename="fox.wav"))
    assert [s.token_ids for s in _segments(renamed)] != [s.token_ids for s in _segments(first)]


async def test_fallback_sampling_is_reproducible_alone_and_concurrently(
    english_model: SpeechModel, fox_wav: bytes
) -> None:
    greedy_with_fallback = TranscribeOptions()
    sampled = TranscribeOptions(temperature=0.6)
    alone = [await _collect(english_model, fox_wav, options) for options in (greedy_with_fallback, sampled)]
    together = await asyncio.gather(
        _collect(english_model, fox_wav, greedy_with_fallback), _collect(english_model, fox_wav, sampled)
    )
    assert list(together) == alone
    assert alone[0] != alone[1]
