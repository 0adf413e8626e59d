"""Protobuf replies to the client's plain dataclasses. Shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from protoserve.client.results import (
    Choice,
    Delta,
    ModelInfo,
    Reply,
    Segment,
    TokenLogprob,
    Tokens,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Transcript,
    TranscriptDelta,
    Usage,
)
from protoserve.v1 import common_pb2, generation_pb2, models_pb2, transcription_pb2

_FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}
_MODALITIES = {
    models_pb2.MODALITY_TEXT: "text",
    models_pb2.MODALITY_IMAGE: "image",
    models_pb2.MODALITY_AUDIO: "audio",
}


def finish_reason(value: int) -> str | None:
    """OpenAI's string for a FinishReason; None while unfinished (and for values this client does not know)."""
    return _FINISH_REASONS.get(value)  # type: ignore[call-overload]


def usage(message: common_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        total_tokens=message.total_tokens,
        cached_tokens=message.cached_tokens,
        reasoning_tokens=message.reasoning_tokens,
    )


def logprobs(messages: Iterable[common_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            token=item.token,
            token_id=item.token_id,
            logprob=item.logprob,
            token_bytes=item.token_bytes,
            top_logprobs=tuple(
                TopLogprob(token=top.token, token_id=top.token_id, logprob=top.logprob, token_bytes=top.token_bytes)
                for top in item.top_logprobs
            ),
        )
        for item in messages
    )


def reply(result: generation_pb2.GenerationResult) -> Reply:
    """The whole reply of ChatUnary or GenerateUnary."""
    choices = tuple(
        Choice(
            index=choice.index,
            text=choice.text,
            reasoning=choice.reasoning_text,
            token_ids=tuple(choice.token_ids),
            tool_calls=tuple(
                ToolCall(
                    id=call.id, name=call.function.name, arguments=call.function.arguments, type=call.type or "function"
                )
                for call in choice.tool_calls
            ),
            finish_reason=finish_reason(choice.finish_reason),
            stop_reason=choice.stop_reason,
            logprobs=logprobs(choice.logprobs),
        )
        for choice in sorted(result.choices, key=lambda choice: choice.index)
    )
    return Reply(
        request_id=result.request_id,
        model=result.model,
        created=result.created,
        choices=choices,
        usage=usage(result.usage) if result.HasField("usage") else None,
    )


def deltas(chunk: generation_pb2.GenerationChunk) -> Iterator[Delta]:
    """The deltas of one stream message, one per choice; usage goes on the last (an empty one if needed)."""
    chunk_usage = usage(chunk.usage) if chunk.HasField("usage") else None
    count = len(chunk.choices)
    for position, choice in enumerate(chunk.choices):
        yield Delta(
            request_id=chunk.request_id,
            model=chunk.model,
            index=choice.index,
            text=choice.text,
            reasoning=choice.reasoning_text,
            token_ids=tuple(choice.token_ids),
            tool_calls=tuple(
                ToolCallDelta(index=call.index, id=call.id, name=call.name, arguments=call.arguments)
                for call in choice.tool_calls
            ),
            finish_reason=finish_reason(choice.finish_reason),
            stop_reason=choice.stop_reason,
            logprobs=logprobs(choice.logprobs),
            usage=chunk_usage if position == count - 1 else None,
        )
    if count == 0 and chunk_usage is not None:
        yield Delta(
            request_id=chunk.request_id,
            model=chunk.model,
            index=0,
            text="",
            reasoning="",
            token_ids=(),
            usage=chunk_usage,
        )


def model_info(message: models_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        id=message.id,
        owned_by=message.owned_by,
        created=message.created,
        modalities=tuple(_MODALITIES[value] for value in message.modalities if value in _MODALITIES),
        context_length=message.context_length,
        quantization=message.quantization,
        loaded=message.loaded,
        architecture=message.architecture,
        dtype=message.dtype,
        device=message.device,
        capabilities=tuple(message.capabilities),
    )


def tokens(message: generation_pb2.TokenizeResponse) -> Tokens:
    return Tokens(
        token_ids=tuple(message.token_ids), tokens=tuple(message.tokens), context_length=message.context_length
    )


def segment(message: transcription_pb2.Segment) -> Segment:
    return Segment(
        id=message.id,
        start=message.start,
        end=message.end,
        text=message.text,
        token_ids=tuple(message.token_ids),
        avg_logprob=message.avg_logprob,
    )


def transcript_delta(chunk: transcription_pb2.TranscriptionChunk) -> TranscriptDelta:
    return TranscriptDelta(
        request_id=chunk.request_id,
        model=chunk.model,
        segments=tuple(segment(item) for item in chunk.segments),
        text_delta=chunk.text_delta,
        done=chunk.done,
        text=chunk.text,
        language=chunk.language,
        duration=chunk.duration,
    )


class TranscriptBuilder:
    """Gathers a transcription stream into one `Transcript`; the last (done) message has the full text."""

    def __init__(self) -> None:
        self._segments: list[Segment] = []
        self._pieces: list[str] = []
        self._last: TranscriptDelta | None = None

    def add(self, delta: TranscriptDelta) -> None:
        self._segments.extend(delta.segments)
        self._pieces.append(delta.text_delta)
        self._last = delta

    def build(self) -> Transcript:
        last = self._last
        if last is None:
            return Transcript(request_id="", model="", text="", language="", duration=0.0, segments=())
        return Transcript(
            request_id=last.request_id,
            model=last.model,
            text=last.text if last.done and last.text else "".join(self._pieces),
            language=last.language,
            duration=last.duration,
            segments=tuple(self._segments),
        )
