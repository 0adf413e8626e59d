"""What callers of a speech model hand in (`TranscribeOptions`) and get back (the events).

A transcription stream is zero or more `SegmentEvent`s, one per decoded 30-second window that held
speech, followed by exactly one `DoneEvent`. Segment ids count up from 0 across the whole stream and
segment times never go backwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from protoserve.server.transcription.whisper_fallback import FallbackPolicy

Task = Literal["transcribe", "translate"]


@dataclass(frozen=True)
class TranscribeOptions:
    """How to transcribe one file. Empty `language` means detect it (multilingual models only).

    `temperature` is where each window's decoding starts (0 is greedy); `fallback` says when a
    window is decoded again hotter or dropped as silence (see `whisper_fallback`). Sampling is
    reproducible: its random generator is seeded from the audio and these options, so the same
    request gives the same transcript.
    """

    language: str = ""
    prompt: str = ""  # text that precedes the audio, given to the decoder as previous text
    temperature: float = 0.0  # 0 is greedy; above 0 samples
    task: Task = "transcribe"
    filename: str = ""  # file name or MIME type, a hint for the audio decoder
    max_seconds: float = 1800.0
    fallback: FallbackPolicy = field(default_factory=FallbackPolicy)


@dataclass(frozen=True)
class Segment:
    """A stretch of recognised speech; times in seconds from the start of the audio."""

    id: int
    start: float
    end: float
    text: str
    token_ids: tuple[int, ...]  # the decoder's tokens for the segment, timestamp tokens included
    avg_logprob: float  # mean log-probability of those tokens


@dataclass(frozen=True)
class SegmentEvent:
    """Segments decoded from one window of audio."""

    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class DoneEvent:
    """The last event: the whole transcript, the language (given or detected), the audio's duration."""

    text: str
    language: str
    duration: float


TranscriptionEvent = SegmentEvent | DoneEvent
