"""Proto generation output -> OpenAI chat completion objects (pure; the route does the I/O).

Streaming invariants, as OpenAI's: every chunk has the same id, created and model; the first chunk of
each choice carries `role: "assistant"` and `content: ""`; the last chunk of each choice carries its
finish_reason; with include_usage every chunk has `usage: null` and one last chunk has `choices: []`
and the usage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from protoserve.translator.mapping.common_response import chat_logprobs, finish_reason, usage_json
from protoserve.v1.common_pb2 import Usage
from protoserve.v1.generation_pb2 import Choice, ChoiceDelta, GenerationChunk, GenerationResult


def _tool_call_json(call: Any) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


def chat_choice(choice: Choice, with_logprobs: bool) -> dict[str, Any]:
    """One choice of a non-streamed chat completion."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_calls:
        message["tool_calls"] = [_tool_call_json(call) for call in choice.tool_calls]
        if not choice.text:
            message["content"] = None
    if choice.reasoning_text:
        message["reasoning_content"] = choice.reasoning_text
    return {
        "index": choice.index,
        "message": message,
        "logprobs": {"content": chat_logprobs(choice.logprobs)} if with_logprobs else None,
        "finish_reason": finish_reason(choice.finish_reason, choice.index) or "stop",
    }


def chat_completion(
    result: GenerationResult, completion_id: str, requested_model: str, with_logprobs: bool
) -> dict[str, Any]:
    """The `chat.completion` object for a unary result."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": result.created or int(time.time()),
        "model": result.model or requested_model,
        "choices": [chat_choice(choice, with_logprobs) for choice in sorted(result.choices, key=lambda c: c.index)],
        "usage": usage_json(result.usage),
        "system_fingerprint": None,
    }


@dataclass
class ChatChunkBuilder:
    """Turns the upstream's GenerationChunks into `chat.completion.chunk` objects, in order.

    Keeps what must be equal on every chunk (id, created, model, taken from the first upstream
    message) and which choices already had their role chunk.
    """

    completion_id: str
    requested_model: str
    include_usage: bool
    with_logprobs: bool
    created: int = 0
    model: str = ""
    _choices_started: set[int] = field(default_factory=set)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _delta_choice(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        content: dict[str, Any] = {}
        if delta.text:
            content["content"] = delta.text
        if delta.reasoning_text:
            content["reasoning_content"] = delta.reasoning_text
        if delta.tool_calls:
            content["tool_calls"] = [self._tool_call_delta(call) for call in delta.tool_calls]
        reason = finish_reason(delta.finish_reason, delta.index)
        logprobs = chat_logprobs(delta.logprobs) if self.with_logprobs and delta.logprobs else None
        if not content and reason is None and logprobs is None:
            return None
        return {
            "index": delta.index,
            "delta": content,
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": reason,
        }

    @staticmethod
    def _tool_call_delta(call: Any) -> dict[str, Any]:
        piece: dict[str, Any] = {"index": call.index}
        function: dict[str, Any] = {}
        if call.id:
            piece["id"] = call.id
            piece["type"] = "function"
        if call.name:
            function["name"] = call.name
        function["arguments"] = call.arguments
        piece["function"] = function
        return piece

    def chunks(self, upstream: GenerationChunk) -> list[dict[str, Any]]:
        """The chunks to send for one upstream message (a role chunk first for new choices)."""
        if not self.created:
            self.created = upstream.created or int(time.time())
            self.model = upstream.model or self.requested_model
        result = []
        for delta in upstream.choices:
            if delta.index not in self._choices_started:
                self._choices_started.add(delta.index)
                role = {
                    "index": delta.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                result.append(self._chunk([role]))
            choice = self._delta_choice(delta)
            if choice is not None:
                result.append(self._chunk([choice]))
        return result

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The final `choices: []` chunk that carries the usage (include_usage only)."""
        chunk = self._chunk([])
        chunk["usage"] = usage_json(usage)
        return chunk
