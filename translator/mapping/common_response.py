"""Pieces of OpenAI response objects shared by every generation route: finish reasons, usage, logprobs.

Finish reasons: STOP -> "stop", LENGTH -> "length", TOOL_CALLS -> "tool_calls". ABORT (the request
was cut short by a cancel, a deadline or a drain, and the server still sent what it had) -> "stop":
OpenAI clients only know stop/length/tool_calls/content_filter, and "length" would wrongly blame the
token limit. ERROR means the server failed on that choice: it becomes an error (HTTP 500, or an
error event mid-stream), never a silent "stop".
"""

from __future__ import annotations

import secrets
from typing import Any

from protoserve.translator.errors import ApiError
from protoserve.v1.common_pb2 import FinishReason, TokenLogprob, TopLogprob, Usage

_FINISH_REASONS = {
    FinishReason.FINISH_REASON_STOP: "stop",
    FinishReason.FINISH_REASON_LENGTH: "length",
    FinishReason.FINISH_REASON_TOOL_CALLS: "tool_calls",
    FinishReason.FINISH_REASON_ABORT: "stop",
}


def new_id(prefix: str) -> str:
    """A fresh OpenAI-style object id: `prefix` with its separator ("chatcmpl-", "resp_") then 24 hex digits."""
    return f"{prefix}{secrets.token_hex(12)}"


def finish_reason(reason: int, choice_index: int) -> str | None:
    """The OpenAI finish_reason of a proto FinishReason; None while unfinished."""
    if reason == FinishReason.FINISH_REASON_UNSPECIFIED:
        return None
    if reason == FinishReason.FINISH_REASON_ERROR:
        raise ApiError(500, f"the model server failed while generating choice {choice_index}")
    return _FINISH_REASONS.get(reason, "stop")  # type: ignore[call-overload]


def _token_bytes(entry: TokenLogprob | TopLogprob) -> list[int]:
    return list(entry.token_bytes) if entry.token_bytes else list(entry.token.encode("utf-8"))


def chat_logprobs(entries: Any) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` list: token, logprob, bytes and top_logprobs per generated token."""
    return [
        {
            "token": entry.token,
            "logprob": entry.logprob,
            "bytes": _token_bytes(entry),
            "top_logprobs": [
                {"token": top.token, "logprob": top.logprob, "bytes": _token_bytes(top)} for top in entry.top_logprobs
            ],
        }
        for entry in entries
    ]


def completion_logprobs(entries: Any, text_offset_start: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object: parallel lists of tokens, logprobs, top maps, offsets."""
    offsets = []
    offset = text_offset_start
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{top.token: top.logprob for top in entry.top_logprobs} for entry in entries],
        "text_offset": offsets,
    }


def usage_json(usage: Usage) -> dict[str, Any]:
    """Chat and completions `usage`, with cached prompt tokens and reasoning tokens in the details."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
