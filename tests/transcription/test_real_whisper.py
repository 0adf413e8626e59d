"""The real whisper tiny.en demo model transcribes espeak-ng speech."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
from protoserve.server.transcription.contract import DoneEvent, SegmentEvent, TranscribeOptions
from protoserve.server.transcription.speech_model import load_speech_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("protoserve.server.demo_models") is None,
    reason="protoserve.server.demo_models (the whisper tiny.en conversion) has not landed yet",
)


async def test_tiny_en_transcribes_the_quick_brown_fox(demo_models: object, fox_wav: bytes) -> None:
    model = load_speech_model(demo_models.speech, device="cpu")  # type: ignore[attr-defined]
    assert not model.multilingual
    events = [event async for event in model.transcribe(fox_wav, TranscribeOptions(filename="fox.wav"))]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert "quick brown fox" in done.text.lower()
    segments = [segment for event in events if isinstance(event, SegmentEvent) for segment in event.segments]
    assert segments and segments[0].start < 0.5 and segments[-1].end <= done.duration + 0.05


def _built_multilingual_folder() -> Path | None:
    """The whisper base folder when it was already built; this test never downloads it."""
    try:
        from protoserve.server.demo_models import default_cache_dir
    except ImportError:
        return None
    folder = default_cache_dir() / "whisper-base"
    return folder if (folder / "config.json").is_file() else None


async def test_multilingual_whisper_detects_german_and_translates(speech_folder: Path) -> None:
    folder = _built_multilingual_folder()
    if folder is None:
        pytest.skip("whisper base is not built; run fetch_multilingual_speech_model() to enable this test")
    german = speech_folder / "german.wav"
    subprocess.run(
        ["espeak-ng", "-v", "de", "-w", str(german), "Guten Morgen. Wie geht es dir heute?"],
        check=True,
        capture_output=True,
    )
    model = load_speech_model(folder, device="cpu")
    assert model.multilingual
    events = [event async for event in model.transcribe(german.read_bytes(), TranscribeOptions(task="translate"))]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.language == "de"
    assert "good morning" in done.text.lower()
