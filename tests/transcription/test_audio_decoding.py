"""decode_audio: formats, resampling, and clear errors for bad or too-long input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.transcription.audio import SAMPLE_RATE, decode_audio


def _tone(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    time = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * time)).astype(np.float32)


@pytest.mark.parametrize("suffix", ["wav", "flac", "ogg"])
def test_sox_formats_decode_to_16k_mono(speech_folder: Path, suffix: str) -> None:
    clip = decode_audio((speech_folder / f"fox.{suffix}").read_bytes(), filename=f"fox.{suffix}", max_seconds=60)
    assert clip.samples.dtype == np.float32
    assert clip.samples.ndim == 1
    assert 1.5 < clip.duration < 6
    assert clip.duration == pytest.approx(clip.samples.size / SAMPLE_RATE)
    assert np.abs(clip.samples).max() > 0.05  # speech, not silence


@pytest.mark.parametrize(("container_format", "codec"), [("mp3", "libmp3lame"), ("ipod", "aac"), ("webm", "libopus")])
def test_compressed_formats_decode(container_format: str, codec: str, encode_audio: Callable[..., bytes]) -> None:
    rate = 48_000 if codec == "libopus" else 44_100
    data = encode_audio(_tone(2.0, rate), container_format, codec, rate=rate)
    clip = decode_audio(data, max_seconds=60)
    assert clip.duration == pytest.approx(2.0, abs=0.1)


def test_resamples(encode_audio: Callable[..., bytes]) -> None:
    clip = decode_audio(encode_audio(_tone(1.0, 8_000), rate=8_000), max_seconds=10)
    assert clip.samples.size == pytest.approx(SAMPLE_RATE, abs=64)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is definitely not audio" * 50, "not audio"),
        (bytes(range(256)) * 40, "not audio|corrupt|no audio"),
    ],
)
def test_bad_input_is_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        decode_audio(data, filename="x.wav", max_seconds=60)


def test_truncated_mp3_is_refused_or_shorter(encode_audio: Callable[..., bytes]) -> None:
    data = encode_audio(_tone(2.0, 44_100), "mp3", "libmp3lame", rate=44_100)
    try:
        clip = decode_audio(data[:300], filename="x.mp3", max_seconds=60)
    except InvalidRequestError as error:
        assert "audio" in str(error)
    else:
        assert clip.duration < 1.0


def test_too_long_audio_is_refused(encode_audio: Callable[..., bytes]) -> None:
    with pytest.raises(InvalidRequestError, match="limit of 3 seconds"):
        decode_audio(encode_audio(_tone(5.0)), max_seconds=3)


def test_too_long_stream_without_declared_duration_stops_early(encode_audio: Callable[..., bytes]) -> None:
    data = encode_audio(_tone(6.0), "adts", "aac")  # raw AAC: no container duration
    with pytest.raises(InvalidRequestError, match="limit of 2 seconds"):
        decode_audio(data, max_seconds=2)


def test_image_bytes_are_not_audio() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 200
    with pytest.raises(InvalidRequestError):
        decode_audio(png, filename="photo.png", max_seconds=60)
