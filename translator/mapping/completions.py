"""POST /v1/completions (legacy) <-> GenerateRequest / GenerationChunk / GenerationResult (pure).

One prompt per request: a string, a list of token ids, or a list holding one of those. `echo`,
`suffix` and `best_of` > 1 are refused with a clear 400 rather than silently ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from protoserve.translator.errors import invalid_request
from protoserve.translator.mapping.common_response import completion_logprobs, finish_reason, usage_json
from protoserve.translator.mapping.fields import UINT32_MAX, Fields, as_int
from protoserve.translator.mapping.request_options import request_options
from protoserve.translator.mapping.sampling import response_format, sampling_params
from protoserve.v1.common_pb2 import Usage
from protoserve.v1.generation_pb2 import GenerateRequest, GenerationChunk, GenerationResult, TokenIds

_MAX_LEGACY_LOGPROBS = 20


def _prompt_into(request: GenerateRequest, value: Any) -> None:
    if isinstance(value, str):
        request.text = value
        return
    if not isinstance(value, list) or not value:
        raise invalid_request(
            "'prompt' must be a string, a list of token ids, or a list of one of those", param="prompt"
        )
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        request.token_ids.CopyFrom(
            TokenIds(ids=[as_int(item, f"prompt[{index}]", 0, UINT32_MAX) for index, item in enumerate(value)])
        )
        return
    if len(value) > 1:
        raise invalid_request("only one prompt per request is supported; send one request per prompt", param="prompt")
    if isinstance(value[0], str | list):
        _prompt_into(request, value[0])
        return
    raise invalid_request("'prompt' must be a string, a list of token ids, or a list of one of those", param="prompt")


def _refuse_unsupported(fields: Fields) -> None:
    if fields.optional_bool("echo"):
        raise invalid_request("'echo' is not supported: the prompt is not returned with the completion", param="echo")
    if fields.optional_string("suffix"):
        raise invalid_request("'suffix' is not supported (no fill-in-the-middle)", param="suffix")
    best_of = fields.optional_int("best_of", 0, UINT32_MAX)
    if best_of is not None and best_of > 1:
        raise invalid_request("'best_of' is not supported; use 'n' to get several completions", param="best_of")


def generate_request(body: Any, request_id: str) -> GenerateRequest:
    """The GenerateRequest for a legacy completions body."""
    fields = Fields(body)
    _refuse_unsupported(fields)
    request = GenerateRequest(
        model=fields.optional_string("model") or "",
        sampling=sampling_params(fields, ("max_tokens",)),
        options=request_options(fields, request_id),
    )
    _prompt_into(request, fields.required("prompt"))
    top_logprobs = fields.optional_int("logprobs", 0, _MAX_LEGACY_LOGPROBS)
    if top_logprobs is not None:
        request.sampling.logprobs = True
        request.sampling.top_logprobs = top_logprobs
    format_fields = fields.optional_object("response_format")
    if format_fields is not None:
        request.sampling.response_format.CopyFrom(response_format(format_fields))
    return request


def text_completion(
    result: GenerationResult, completion_id: str, requested_model: str, with_logprobs: bool
) -> dict[str, Any]:
    """The `text_completion` object for a unary result."""
    choices = [
        {
            "index": choice.index,
            "text": choice.text,
            "logprobs": completion_logprobs(choice.logprobs, 0) if with_logprobs else None,
            "finish_reason": finish_reason(choice.finish_reason, choice.index) or "stop",
        }
        for choice in sorted(result.choices, key=lambda choice: choice.index)
    ]
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": result.created or int(time.time()),
        "model": result.model or requested_model,
        "choices": choices,
        "usage": usage_json(result.usage),
        "system_fingerprint": None,
    }


@dataclass
class CompletionChunkBuilder:
    """Upstream GenerationChunks -> streamed `text_completion` objects with a stable id/created/model."""

    completion_id: str
    requested_model: str
    include_usage: bool
    with_logprobs: bool
    created: int = 0
    model: str = ""
    _text_lengths: dict[int, int] = field(default_factory=dict)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def chunks(self, upstream: GenerationChunk) -> list[dict[str, Any]]:
        if not self.created:
            self.created = upstream.created or int(time.time())
            self.model = upstream.model or self.requested_model
        result = []
        for delta in upstream.choices:
            reason = finish_reason(delta.finish_reason, delta.index)
            if not delta.text and reason is None and not (self.with_logprobs and delta.logprobs):
                continue
            offset = self._text_lengths.get(delta.index, 0)
            self._text_lengths[delta.index] = offset + len(delta.text)
            choice = {
                "index": delta.index,
                "text": delta.text,
                "logprobs": completion_logprobs(delta.logprobs, offset) if self.with_logprobs else None,
                "finish_reason": reason,
            }
            result.append(self._chunk([choice]))
        return result

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage_json(usage)
        return chunk
