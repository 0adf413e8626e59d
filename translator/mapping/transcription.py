"""Transcription results -> the bodies of OpenAI's response formats (json, text, verbose_json, srt,
vtt), and the streamed `transcript.text.delta` / `transcript.text.done` events (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protoserve.v1.transcription_pb2 import Segment, TranscriptionChunk

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
_CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
}


@dataclass
class Transcript:
    """What a whole transcription stream said: segments in order, text, language and duration."""

    task: str
    segments: list[Segment] = field(default_factory=list)
    text: str = ""
    language: str = ""
    duration: float = 0.0
    model: str = ""
    _deltas: list[str] = field(default_factory=list)

    def add(self, chunk: TranscriptionChunk) -> None:
        self.segments.extend(chunk.segments)
        self._deltas.append(chunk.text_delta)
        self.model = chunk.model or self.model
        if chunk.done:
            self.text = chunk.text
            self.language = chunk.language
            self.duration = chunk.duration

    @property
    def full_text(self) -> str:
        """The final text, or the deltas joined when the server sent no final text."""
        return self.text or "".join(self._deltas)


def _timestamp(seconds: float, decimal_mark: str) -> str:
    milliseconds = max(0, round(seconds * 1000))
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole_seconds, milliseconds = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole_seconds:02d}{decimal_mark}{milliseconds:03d}"


def srt(segments: list[Segment]) -> str:
    """SubRip: numbered cues with `HH:MM:SS,mmm --> HH:MM:SS,mmm`."""
    cues = [
        f"{number}\n{_timestamp(segment.start, ',')} --> {_timestamp(segment.end, ',')}\n{segment.text.strip()}\n"
        for number, segment in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def vtt(segments: list[Segment]) -> str:
    """WebVTT: a `WEBVTT` header and cues with `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    cues = [
        f"{_timestamp(segment.start, '.')} --> {_timestamp(segment.end, '.')}\n{segment.text.strip()}\n"
        for segment in segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def verbose_json(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's verbose_json: task, language, duration, text and timed segments."""
    return {
        "task": transcript.task,
        "language": transcript.language,
        "duration": transcript.duration,
        "text": transcript.full_text,
        "segments": [
            {
                "id": segment.id,
                "seek": 0,
                "start": segment.start,
                "end": segment.end,
                "text": segment.text,
                "tokens": list(segment.token_ids),
                "temperature": 0.0,
                "avg_logprob": segment.avg_logprob,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for segment in transcript.segments
        ],
    }


def formatted_body(transcript: Transcript, response_format: str) -> tuple[str | dict[str, Any], str]:
    """(body, content type) of a transcript in `response_format` (one of RESPONSE_FORMATS)."""
    content_type = _CONTENT_TYPES[response_format]
    if response_format == "json":
        return {"text": transcript.full_text}, content_type
    if response_format == "verbose_json":
        return verbose_json(transcript), content_type
    if response_format == "srt":
        return srt(transcript.segments), content_type
    if response_format == "vtt":
        return vtt(transcript.segments), content_type
    return transcript.full_text, content_type


def delta_event(chunk: TranscriptionChunk) -> list[dict[str, Any]]:
    """A `transcript.text.delta` event for a chunk with new text (none for an empty one)."""
    return [{"type": "transcript.text.delta", "delta": chunk.text_delta, "logprobs": []}] if chunk.text_delta else []


def done_event(transcript: Transcript) -> dict[str, Any]:
    """The final `transcript.text.done` event with the whole text."""
    return {"type": "transcript.text.done", "text": transcript.full_text, "logprobs": []}
