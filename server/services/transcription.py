"""TranscriptionService: audio bytes in, segments streamed out, the whole transcript last.

Requests are checked before any decoding (audio size against the server's limit, language, task,
temperature, prompt length); the speech model decodes and transcribes in its own worker thread and
yields `SegmentEvent`s then one `DoneEvent`, which become `TranscriptionChunk`s here. A cancelled
call closes the model's event stream, so the model stops after the window it is decoding.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeAlias

import grpc.aio
from protoserve.server.config import ServerConfig
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.errors import rpc_errors
from protoserve.server.metrics import ServerMetrics
from protoserve.server.registry import ModelRegistry
from protoserve.server.request_log import new_request_id
from protoserve.server.transcription.contract import DoneEvent, SegmentEvent, TranscribeOptions
from protoserve.v1 import transcription_pb2, transcription_pb2_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

MAX_PROMPT_CHARS = 4096
MAX_FILENAME_CHARS = 256
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")
_TASKS = {
    transcription_pb2.TranscribeRequest.TASK_TRANSCRIBE: "transcribe",
    transcription_pb2.TranscribeRequest.TASK_TRANSLATE: "translate",
}


def check_transcribe_request(
    request: transcription_pb2.TranscribeRequest, max_audio_bytes: int, max_request_id_chars: int
) -> None:
    """Raise InvalidRequestError, naming the field, for anything the model must not be asked."""
    audio_bytes = len(request.audio)
    if audio_bytes == 0:
        raise InvalidRequestError("audio is empty: send the bytes of an audio file (wav, flac, mp3, ogg, m4a, webm)")
    if audio_bytes > max_audio_bytes:
        raise InvalidRequestError(
            f"audio is {audio_bytes} bytes; this server accepts at most {max_audio_bytes} bytes"
        )
    if request.language and not _LANGUAGE_CODE.match(request.language.lower()):
        raise InvalidRequestError(
            f"language {request.language[:32]!r} is not an ISO-639-1 code such as 'en'; leave it empty to detect it"
        )
    if request.task not in _TASKS:
        raise InvalidRequestError(f"task {request.task} is unknown; use TASK_TRANSCRIBE or TASK_TRANSLATE")
    if not math.isfinite(request.temperature) or not 0.0 <= request.temperature <= 1.0:
        raise InvalidRequestError(f"temperature {request.temperature} is outside [0, 1]")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(f"prompt is {len(request.prompt)} characters; at most {MAX_PROMPT_CHARS}")
    if len(request.filename) > MAX_FILENAME_CHARS:
        raise InvalidRequestError(f"filename is {len(request.filename)} characters; at most {MAX_FILENAME_CHARS}")
    if len(request.options.request_id) > max_request_id_chars:
        raise InvalidRequestError(
            f"options.request_id is {len(request.options.request_id)} characters; at most {max_request_id_chars}"
        )


def _segment(segment: Any) -> transcription_pb2.Segment:
    return transcription_pb2.Segment(
        id=int(segment.id),
        start=float(segment.start),
        end=float(segment.end),
        text=str(segment.text),
        token_ids=[int(token_id) for token_id in segment.token_ids],
        avg_logprob=float(segment.avg_logprob),
    )


class TranscriptionServicer(transcription_pb2_grpc.TranscriptionServiceServicer):
    """Streams a speech model's events as TranscriptionChunks."""

    def __init__(self, registry: ModelRegistry, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self._registry = registry
        self._config = config
        self._metrics = metrics or ServerMetrics()

    async def Transcribe(
        self, request: transcription_pb2.TranscribeRequest, context: Context
    ) -> AsyncIterator[transcription_pb2.TranscriptionChunk]:
        request_id = request.options.request_id or new_request_id()
        label = self._registry.metrics_label(request.model, "speech")
        limits = self._config.limits
        async with rpc_errors(context, request_id), self._metrics.observe(label, "Transcribe", context):
            check_transcribe_request(request, limits.max_audio_bytes, limits.max_request_id_chars)
            served = await self._registry.speech_model(request.model)
            model_id = served.description.id
            options = _transcribe_options(request, limits.max_audio_seconds)
            finished = False
            async with self._registry.lease(model_id), aclosing(
                served.model.transcribe(bytes(request.audio), options)
            ) as events:
                async for event in events:
                    if finished:
                        raise RuntimeError("the speech model sent events after its DoneEvent")
                    if isinstance(event, SegmentEvent):
                        segments = [_segment(segment) for segment in event.segments]
                        yield transcription_pb2.TranscriptionChunk(
                            request_id=request_id,
                            model=model_id,
                            segments=segments,
                            text_delta="".join(segment.text for segment in segments),
                        )
                    elif isinstance(event, DoneEvent):
                        finished = True
                        yield transcription_pb2.TranscriptionChunk(
                            request_id=request_id,
                            model=model_id,
                            done=True,
                            text=str(event.text),
                            language=str(event.language),
                            duration=float(event.duration),
                        )
                    else:
                        raise TypeError(f"the speech model sent an unknown event {type(event).__name__}")
            if not finished:
                raise RuntimeError("the speech model's stream ended without a DoneEvent")


def _transcribe_options(request: transcription_pb2.TranscribeRequest, max_seconds: float) -> TranscribeOptions:
    return TranscribeOptions(
        language=request.language.lower(),
        prompt=request.prompt,
        temperature=float(request.temperature),
        task=_TASKS[request.task],
        filename=request.filename,
        max_seconds=max_seconds,
    )
