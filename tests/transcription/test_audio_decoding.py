"""decode_audio: formats, resampling, and clear errors for bad or too-long input."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
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


def _wav(samples_by_channel: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A WAV file of (samples, channels) int16 or float32 samples, written by hand (any channel count)."""
    channels = samples_by_channel.shape[1]
    tag, width = (3, 4) if samples_by_channel.dtype == np.float32 else (1, 2)
    block = channels * width
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, tag, channels, rate, rate * block, block, width * 8)
    data = samples_by_channel.astype("<f4" if tag == 3 else "<i2").tobytes()
    body = b"WAVE" + fmt + struct.pack("<4sI", b"data", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("channels", [2, 6, 9, 13, 25])
def test_any_channel_count_is_downmixed(channels: int) -> None:
    """FFmpeg has no default layout (so no downmix) for 9, 11, 13, 15, 17-23 and 25+ channels: those
    are averaged (the same tone in every channel stays at 0.3); FFmpeg's own downmix weighs channels."""
    pcm = (_tone(1.0) * 32767).astype(np.int16)
    clip = decode_audio(_wav(np.repeat(pcm[:, None], channels, axis=1)), filename="x.wav", max_seconds=10)
    assert clip.duration == pytest.approx(1.0, abs=0.01)
    peak = float(np.abs(clip.samples).max())
    assert peak == pytest.approx(0.3, abs=0.01) if channels > 8 else 0.29 < peak <= 1.0


@pytest.mark.parametrize(("amplitude", "peak"), [(0.5, 0.5), (4.0, 1.0), (1e20, 1.0)])
def test_float_audio_beyond_full_scale_is_scaled_to_it(amplitude: float, peak: float) -> None:
    """Samples of 1e18 and more made whisper's features NaN (INTERNAL when sampling from them)."""
    tone = _tone(1.0) / np.float32(0.3) * np.float32(amplitude)
    clip = decode_audio(_wav(tone[:, None]), filename="x.wav", max_seconds=10)
    assert np.isfinite(clip.samples).all()
    assert np.abs(clip.samples).max() == pytest.approx(peak, rel=0.01)


class _UnseekableSink(io.RawIOBase):
    """Where a live recorder writes: no seeking back, so the container never gets a duration."""

    def __init__(self) -> None:
        self.written = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.written += bytes(data)
        return len(data)


def test_too_long_live_recording_says_so(encode_audio: Callable[..., bytes]) -> None:
    """A webm written as a browser's MediaRecorder does (no duration) was reported as corrupt."""
    sink = _UnseekableSink()
    rate = 48_000
    with av.open(sink, mode="w", format="webm") as container:
        stream = container.add_stream("libopus", rate=rate)
        stream.layout = "mono"
        pcm = (_tone(6.0, rate) * 32767).astype(np.int16)
        for start in range(0, pcm.size, 960):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 960], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(InvalidRequestError, match="limit of 2 seconds"):
        decode_audio(bytes(sink.written), filename="live.webm", max_seconds=2)
