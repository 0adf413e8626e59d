"""Decode an uploaded audio file into 16 kHz mono float32 samples, the input whisper expects.

Decoding streams frame by frame through PyAV (FFmpeg), so a file over the duration limit is refused
as soon as the limit is passed, without decoding the rest. Every failure is an InvalidRequestError
whose message names the problem.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePosixPath

import av
import numpy as np
from protoserve.server.engine.errors import InvalidRequestError

SAMPLE_RATE = 16_000
SUPPORTED_FORMATS = "wav, flac, mp3, ogg/opus, m4a, webm"
# Demuxers to try when probing the content fails, keyed by file extension or MIME subtype.
_DEMUXER_BY_HINT = {
    "wav": "wav", "wave": "wav", "x-wav": "wav", "flac": "flac", "mp3": "mp3", "mpeg": "mp3", "mpga": "mp3",
    "ogg": "ogg", "oga": "ogg", "opus": "ogg", "m4a": "mov,mp4,m4a,3gp,3g2,mj2", "mp4": "mov,mp4,m4a,3gp,3g2,mj2",
    "webm": "matroska,webm", "mka": "matroska,webm",
}  # fmt: skip


@dataclass(frozen=True)
class AudioClip:
    """Decoded audio: mono float32 samples at 16 kHz, and their duration in seconds."""

    samples: np.ndarray
    duration: float


def _demuxer_hint(filename: str) -> str | None:
    hint = filename.strip().lower()
    if "/" in hint and not hint.startswith("/") and "." not in hint:  # a MIME type such as audio/mpeg
        hint = hint.rsplit("/", 1)[1]
    else:
        hint = PurePosixPath(hint).suffix.lstrip(".")
    return _DEMUXER_BY_HINT.get(hint)


def _open_container(data: bytes, filename: str) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, UnicodeDecodeError):
        demuxer = _demuxer_hint(filename)
        if demuxer is None:
            raise InvalidRequestError(f"the file is not audio this server can decode ({SUPPORTED_FORMATS})") from None
    try:
        return av.open(io.BytesIO(data), mode="r", format=demuxer.split(",")[0])
    except (av.FFmpegError, ValueError, UnicodeDecodeError):
        raise InvalidRequestError(f"the file is not audio this server can decode ({SUPPORTED_FORMATS})") from None


# Full scale of each sample format, for the frames downmixed here rather than by FFmpeg.
_FULL_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0**31, "s64": 2.0**63, "flt": 1.0, "dbl": 1.0}


def _averaged_to_mono(frame: av.AudioFrame) -> av.AudioFrame:
    """The frame's channels averaged into one float32 channel at full scale 1. For channel counts
    that FFmpeg has no default layout for (9, 11, 13, 15, 17-23, 25 and more), whose downmix
    graph the resampler cannot build."""
    raw = frame.to_ndarray()
    channels = len(frame.layout.channels)
    per_channel = raw if frame.format.is_planar else raw.reshape(-1, channels).T
    base_format = frame.format.name.removesuffix("p")
    if base_format not in _FULL_SCALE:
        raise InvalidRequestError(f"audio samples in the {frame.format.name} format are not supported")
    samples = per_channel.astype(np.float64)
    if base_format == "u8":
        samples -= 128.0
    samples /= _FULL_SCALE[base_format]
    averaged = samples.mean(axis=0, keepdims=True).astype(np.float32)
    mono = av.AudioFrame.from_ndarray(averaged, format="flt", layout="mono")
    mono.sample_rate = frame.sample_rate
    return mono


def _full_scale(samples: np.ndarray) -> np.ndarray:
    """Float audio louder than full scale (|x| > 1) scaled down to it. Only float files can hold
    such samples; far beyond it (1e18 and up) whisper's log-mel features overflow to NaN."""
    peak = float(np.abs(samples).max())
    return samples / np.float32(peak) if peak > 1.0 else samples


def _too_long(max_seconds: float) -> InvalidRequestError:
    return InvalidRequestError(
        f"the audio is longer than this server's limit of {max_seconds:g} seconds; send a shorter file"
    )


def decode_audio(data: bytes, *, filename: str = "", max_seconds: float) -> AudioClip:
    """Decode `data` (any container and codec FFmpeg knows) to 16 kHz mono float32.

    `filename` (a name or a MIME type) only helps when the content alone cannot be identified.
    Raises InvalidRequestError for empty, non-audio, corrupt, silent-of-samples or too-long input.
    """
    if not data:
        raise InvalidRequestError("the audio file is empty")
    if max_seconds <= 0:
        raise InvalidRequestError("max_seconds must be positive")
    max_samples = int(max_seconds * SAMPLE_RATE)
    container = _open_container(data, filename)
    try:
        if not container.streams.audio:
            raise InvalidRequestError("the file holds no audio stream")
        declared_seconds = container.duration / av.time_base if container.duration else 0.0
        if declared_seconds > max_seconds + 1.0:
            raise _too_long(max_seconds)
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        average_channels = False  # set when FFmpeg cannot downmix this channel count itself
        pieces: list[np.ndarray] = []
        total = 0
        try:
            for position, frame in enumerate(container.decode(stream)):
                if average_channels:
                    converted_frames = resampler.resample(_averaged_to_mono(frame))
                else:
                    try:
                        converted_frames = resampler.resample(frame)
                    except av.ArgumentError:
                        if position > 0:
                            raise
                        average_channels = True  # no downmix for this layout: average the channels here
                        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                        converted_frames = resampler.resample(_averaged_to_mono(frame))
                for converted in converted_frames:
                    piece = converted.to_ndarray().reshape(-1)
                    pieces.append(piece)
                    total += piece.size
                if total > max_samples:
                    raise _too_long(max_seconds)
            for converted in resampler.resample(None):
                piece = converted.to_ndarray().reshape(-1)
                pieces.append(piece)
                total += piece.size
        except InvalidRequestError:  # too long: already says so (it is a ValueError too)
            raise
        except (av.FFmpegError, ValueError) as error:
            raise InvalidRequestError(f"the audio file is corrupt or truncated ({type(error).__name__})") from None
    finally:
        container.close()
    if total == 0:
        raise InvalidRequestError("the audio file holds no samples")
    if total > max_samples:
        raise _too_long(max_seconds)
    samples = np.ascontiguousarray(np.concatenate(pieces), dtype=np.float32)
    if not np.isfinite(samples).all():
        raise InvalidRequestError("the audio holds invalid (non-finite) samples")
    samples = _full_scale(samples)
    return AudioClip(samples=samples, duration=samples.size / SAMPLE_RATE)
