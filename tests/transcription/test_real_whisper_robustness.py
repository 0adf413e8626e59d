"""The real whisper tiny.en with fallback and silence detection: speech still transcribes, noise
gives no hallucinated text, long speech transcribes in every window, sampling repeats per request."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from protoserve.server.transcription import speech_model as speech_model_module
from protoserve.server.transcription.contract import DoneEvent, SegmentEvent, TranscribeOptions
from protoserve.server.transcription.speech_model import SpeechModel, load_speech_model
from protoserve.server.transcription.whisper_fallback import NO_FALLBACK

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("protoserve.server.demo_models") is None,
    reason="protoserve.server.demo_models (the whisper tiny.en conversion) has not landed yet",
)

# Distinct sentences (repeated ones would compress well and count as a decoder loop), about 35 s.
PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. Every morning the baker opens his shop at six and sells "
    "fresh bread to the neighbours. Yesterday it rained all afternoon, so the children stayed inside and "
    "played chess with their grandfather. The river that runs through the old town is crossed by seven "
    "stone bridges. My sister works as a nurse in a large hospital near the harbour. In the autumn the "
    "leaves in the park turn red and yellow before they fall. We took the last train home and arrived a "
    "little after midnight. The library downstairs keeps maps of every country in the world. A small "
    "green boat was waiting for us at the end of the wooden pier."
)


@pytest.fixture(scope="module")
def tiny_en(demo_models: Any) -> SpeechModel:
    return load_speech_model(demo_models.speech, device="cpu")


@pytest.fixture(scope="module")
def paragraph_wav(speech_folder: Path) -> bytes:
    raw, wav = speech_folder / "paragraph-raw.wav", speech_folder / "paragraph.wav"
    if not wav.exists():
        subprocess.run(["espeak-ng", "-w", str(raw), PARAGRAPH], check=True, capture_output=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True, capture_output=True)
    return wav.read_bytes()


async def _collect(model: SpeechModel, audio: bytes, options: TranscribeOptions) -> list[Any]:
    return [event async for event in model.transcribe(audio, options)]


def _record_decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], float]]:
    """Wrap decode_window to record each decode's prefix and temperature."""
    calls: list[tuple[list[int], float]] = []
    original: Callable[..., Any] = speech_model_module.decode_window

    def recording(model: Any, encoder_outputs: Any, prefix: list[int], *args: Any, **kwargs: Any) -> Any:
        calls.append((list(prefix), kwargs["temperature"]))
        return original(model, encoder_outputs, prefix, *args, **kwargs)

    monkeypatch.setattr(speech_model_module, "decode_window", recording)
    return calls


async def test_clear_speech_is_accepted_greedily(
    tiny_en: SpeechModel, fox_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_decodes(monkeypatch)
    events = await _collect(tiny_en, fox_wav, TranscribeOptions(filename="fox.wav"))
    assert "quick brown fox" in events[-1].text.lower()
    assert [temperature for _, temperature in calls] == [0.0]  # no fallback needed
    segments = [segment for event in events if isinstance(event, SegmentEvent) for segment in event.segments]
    assert all(segment.avg_logprob > -1.0 for segment in segments)


async def test_noise_is_silence_not_hallucinated_text(tiny_en: SpeechModel, encode_audio: Callable[..., bytes]) -> None:
    noise = (np.random.default_rng(0).standard_normal(5 * 16_000) * 0.03).astype(np.float32)
    audio = encode_audio(noise)
    events = await _collect(tiny_en, audio, TranscribeOptions())
    assert len(events) == 1 and isinstance(events[0], DoneEvent)
    assert events[0].text == "" and events[0].duration == pytest.approx(5.0, abs=0.01)
    unguarded = await _collect(tiny_en, audio, TranscribeOptions(fallback=NO_FALLBACK))
    assert unguarded[-1].text, "without the no-speech rule tiny.en invents words for noise"


async def test_long_speech_transcribes_every_window_without_earlier_text_as_prompt(
    tiny_en: SpeechModel, paragraph_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_decodes(monkeypatch)
    events = await _collect(tiny_en, paragraph_wav, TranscribeOptions())
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.duration > 30.0
    window_events = [event for event in events if isinstance(event, SegmentEvent)]
    assert len(window_events) >= 2  # every window gave segments
    assert "grandfather" in done.text.lower() and "every country" in done.text.lower()
    last_window = " ".join(segment.text for segment in window_events[-1].segments).lower()
    assert "every country" in last_window or "boat" in last_window or "pier" in last_window
    assert len(calls) >= 2
    assert all(prefix == [tiny_en.tokens.start_of_transcript] for prefix, _ in calls)  # no earlier text fed back


async def test_sampled_transcription_repeats_per_request(tiny_en: SpeechModel, fox_wav: bytes) -> None:
    options = TranscribeOptions(temperature=0.4)
    first = await _collect(tiny_en, fox_wav, options)
    second = await _collect(tiny_en, fox_wav, options)
    assert first == second
    assert "lazy dog" in first[-1].text.lower()  # sampled, yet still the sentence
