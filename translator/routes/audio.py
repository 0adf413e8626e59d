"""POST /v1/audio/transcriptions and /v1/audio/translations: a multipart upload -> Transcribe.

Form fields as OpenAI's: file (required), model, language (transcriptions only), prompt,
response_format (json, text, verbose_json, srt, vtt), temperature, stream ("true": SSE
`transcript.text.delta` events, then `transcript.text.done`). Other fields are ignored.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web
from protoserve.translator.errors import invalid_request
from protoserve.translator.mapping.transcription import (
    RESPONSE_FORMATS,
    Transcript,
    delta_event,
    done_event,
    formatted_body,
)
from protoserve.translator.multipart_form import UploadedForm, read_form
from protoserve.translator.routes.streaming import relay
from protoserve.translator.state import call_options, config_of, upstream_of
from protoserve.v1.common_pb2 import RequestOptions
from protoserve.v1.transcription_pb2 import TranscribeRequest, TranscriptionChunk


def _temperature(form: UploadedForm) -> float:
    raw = form.fields.get("temperature", "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise invalid_request(f"'temperature' must be a number, not {raw!r}", param="temperature")
    return value


def _stream_flag(form: UploadedForm) -> bool:
    raw = form.fields.get("stream", "false").strip().lower()
    if raw not in ("true", "false", ""):
        raise invalid_request(f"'stream' must be true or false, not {raw!r}", param="stream")
    return raw == "true"


def transcribe_request(form: UploadedForm, task: int, request_id: str) -> TranscribeRequest:
    """The TranscribeRequest for a parsed upload."""
    if form.file_bytes is None:
        raise invalid_request("'file' is required: upload the audio as the form field 'file'", param="file")
    if not form.file_bytes:
        raise invalid_request("the uploaded file is empty", param="file")
    return TranscribeRequest(
        model=form.fields.get("model", ""),
        audio=form.file_bytes,
        filename=form.file_name or form.file_content_type,
        language=form.fields.get("language", "") if task == TranscribeRequest.TASK_TRANSCRIBE else "",
        prompt=form.fields.get("prompt", ""),
        temperature=_temperature(form),
        task=task,  # type: ignore[arg-type]
        options=RequestOptions(request_id=request_id, user=form.fields.get("user", "")),
    )


async def _transcribe(request: web.Request, task: int) -> web.StreamResponse:
    config = config_of(request)
    form = await read_form(request, "file", config.max_audio_bytes, config.max_body_bytes)
    options = call_options(request)
    transcribe = transcribe_request(form, task, options.request_id)
    response_format = form.fields.get("response_format", "json") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise invalid_request(
            f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}, not {response_format!r}",
            param="response_format",
        )
    stream = _stream_flag(form)
    upstream = upstream_of(request)
    call = upstream.transcription.Transcribe(transcribe, metadata=options.metadata, timeout=options.timeout)
    transcript = Transcript(task="translate" if task == TranscribeRequest.TASK_TRANSLATE else "transcribe")
    if stream:

        def to_events(chunk: TranscriptionChunk) -> list[dict[str, Any]]:
            transcript.add(chunk)
            return delta_event(chunk)

        return await relay(
            request, upstream.stream(call), to_events, lambda: [done_event(transcript)], done_marker=False
        )
    async for chunk in upstream.stream(call):
        transcript.add(chunk)
    body, content_type = formatted_body(transcript, response_format)
    if isinstance(body, dict):
        return web.json_response(body)
    return web.Response(text=body, content_type=content_type)


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, TranscribeRequest.TASK_TRANSCRIBE)


async def translations(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, TranscribeRequest.TASK_TRANSLATE)
