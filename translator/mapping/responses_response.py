"""Proto generation output -> Responses API objects and streamed events (pure).

Only choice 0 is used (the Responses API has no `n`). Output items come in the order the model
produced them: a reasoning item, a message item (one output_text part), function_call items. In a
stream an item is opened when its first piece arrives and closed (its `.done` events) when the next
item opens or the response ends. Every event carries `type` and an increasing `sequence_number`.

A response cut off by its token limit (a LENGTH finish) is `incomplete` with reason
`max_output_tokens`, as OpenAI's is: its last output item (the one cut off) has status `incomplete`
and a stream ends with `response.incomplete` instead of `response.completed`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from protoserve.translator.errors import ApiError
from protoserve.translator.mapping.common_response import finish_reason, new_id
from protoserve.v1.common_pb2 import FinishReason, Usage
from protoserve.v1.generation_pb2 import ChoiceDelta, GenerationChunk, GenerationResult


def responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if status != "in_progress" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [], "content": content}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def closed_item_status(reason: int) -> str:
    """The status of the item a response ends on: `incomplete` when the token limit cut it off."""
    return "incomplete" if reason == FinishReason.FINISH_REASON_LENGTH else "completed"


def response_object(
    response_id: str,
    created_at: int,
    model: str,
    echo: dict[str, Any],
    output: list[dict[str, Any]],
    status: str,
    usage: Usage | None,
    reason: int,
) -> dict[str, Any]:
    """A `response` object; a LENGTH finish makes it `incomplete` (reason max_output_tokens)."""
    incomplete = status == "completed" and reason == FinishReason.FINISH_REASON_LENGTH
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "incomplete" if incomplete else status,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "model": model,
        "output": output,
        "usage": responses_usage(usage) if usage is not None else None,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        **echo,
    }


def response_from_result(
    result: GenerationResult, response_id: str, requested_model: str, echo: dict[str, Any]
) -> dict[str, Any]:
    """The whole `response` object of a unary result."""
    choice = next((choice for choice in result.choices if choice.index == 0), None)
    output: list[dict[str, Any]] = []
    reason = FinishReason.FINISH_REASON_STOP
    if choice is not None:
        finish_reason(choice.finish_reason, 0)  # raises on ERROR
        reason = choice.finish_reason
        if choice.reasoning_text:
            output.append(reasoning_item(new_id("rs_"), choice.reasoning_text, "completed"))
        if choice.text:
            output.append(message_item(new_id("msg_"), choice.text, "completed"))
        for call in choice.tool_calls:
            output.append(
                function_call_item(new_id("fc_"), call.id, call.function.name, call.function.arguments, "completed")
            )
        if output:
            output[-1]["status"] = closed_item_status(reason)
    return response_object(
        response_id,
        result.created or int(time.time()),
        result.model or requested_model,
        echo,
        output,
        "completed",
        result.usage,
        reason,
    )


@dataclass
class _OpenItem:
    kind: str  # "reasoning", "message" or "function_call"
    item_id: str
    output_index: int
    text: str = ""
    call_id: str = ""
    name: str = ""
    call_index: int = -1


@dataclass
class ResponseEventBuilder:
    """Upstream GenerationChunks -> Responses API stream events."""

    response_id: str
    requested_model: str
    echo: dict[str, Any]
    created_at: int = 0
    model: str = ""
    usage: Usage | None = None
    reason: int = FinishReason.FINISH_REASON_UNSPECIFIED
    _sequence: int = 0
    _current: _OpenItem | None = None
    _output: list[dict[str, Any]] = field(default_factory=list)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _response(self, status: str) -> dict[str, Any]:
        return response_object(
            self.response_id,
            self.created_at,
            self.model,
            self.echo,
            list(self._output),
            status,
            self.usage if status != "in_progress" else None,
            self.reason,
        )

    def _open(
        self, kind: str, events: list[dict[str, Any]], call_id: str = "", name: str = "", call_index: int = -1
    ) -> _OpenItem:
        events.extend(self._close())
        prefix = {"reasoning": "rs_", "message": "msg_", "function_call": "fc_"}[kind]
        item = _OpenItem(kind, new_id(prefix), len(self._output), call_id=call_id, name=name, call_index=call_index)
        self._current = item
        self._output.append({})  # reserve the index; filled when the item closes
        events.append(
            self._event(
                "response.output_item.added", output_index=item.output_index, item=self._item_json(item, "in_progress")
            )
        )
        if kind == "message":
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.item_id,
                    output_index=item.output_index,
                    content_index=0,
                    part=_text_part(""),
                )
            )
        return item

    @staticmethod
    def _item_json(item: _OpenItem, status: str) -> dict[str, Any]:
        if item.kind == "message":
            return message_item(item.item_id, item.text, status)
        if item.kind == "reasoning":
            return reasoning_item(item.item_id, item.text, status)
        return function_call_item(item.item_id, item.call_id, item.name, item.text, status)

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        """The `.done` events of the open item, which ends with `status`."""
        item, self._current = self._current, None
        if item is None:
            return []
        where = {"item_id": item.item_id, "output_index": item.output_index}
        events = []
        if item.kind == "message":
            events.append(
                self._event("response.output_text.done", **where, content_index=0, text=item.text, logprobs=[])
            )
            events.append(
                self._event("response.content_part.done", **where, content_index=0, part=_text_part(item.text))
            )
        elif item.kind == "reasoning":
            events.append(self._event("response.reasoning_text.done", **where, content_index=0, text=item.text))
        else:
            events.append(
                self._event("response.function_call_arguments.done", **where, name=item.name, arguments=item.text)
            )
        done = self._item_json(item, status)
        self._output[item.output_index] = done
        events.append(self._event("response.output_item.done", output_index=item.output_index, item=done))
        return events

    def _text_events(self, kind: str, text: str, events: list[dict[str, Any]]) -> None:
        item = self._current if self._current is not None and self._current.kind == kind else self._open(kind, events)
        item.text += text
        where = {"item_id": item.item_id, "output_index": item.output_index, "content_index": 0, "delta": text}
        if kind == "message":
            events.append(self._event("response.output_text.delta", **where, logprobs=[]))
        else:
            events.append(self._event("response.reasoning_text.delta", **where))

    def _delta_events(self, delta: ChoiceDelta, events: list[dict[str, Any]]) -> None:
        if delta.reasoning_text:
            self._text_events("reasoning", delta.reasoning_text, events)
        if delta.text:
            self._text_events("message", delta.text, events)
        for call in delta.tool_calls:
            item = self._current
            if item is None or item.kind != "function_call" or item.call_index != call.index:
                item = self._open(
                    "function_call", events, call_id=call.id or new_id("call_"), name=call.name, call_index=call.index
                )
            if call.arguments:
                item.text += call.arguments
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=item.item_id,
                        output_index=item.output_index,
                        delta=call.arguments,
                    )
                )
        if finish_reason(delta.finish_reason, 0) is not None:
            self.reason = delta.finish_reason

    def events(self, upstream: GenerationChunk) -> list[dict[str, Any]]:
        """The events for one upstream message; the first also opens the response. A message that
        fails the generation (an ERROR finish) raises ApiError and uses up no sequence numbers, so
        the error event that follows comes next in the sequence."""
        sequence_before = self._sequence
        try:
            events = self._start(upstream.created, upstream.model)
            if upstream.HasField("usage"):
                self.usage = upstream.usage
            for delta in upstream.choices:
                if delta.index == 0:
                    self._delta_events(delta, events)
        except ApiError:
            self._sequence = sequence_before
            raise
        return events

    def _start(self, created: int, model: str) -> list[dict[str, Any]]:
        if self.created_at:
            return []
        self.created_at = created or int(time.time())
        self.model = model or self.requested_model
        return [
            self._event("response.created", response=self._response("in_progress")),
            self._event("response.in_progress", response=self._response("in_progress")),
        ]

    def finish(self) -> list[dict[str, Any]]:
        """Close the open item and end the response: `response.completed`, or `response.incomplete`
        when the token limit cut it off."""
        events = self._start(0, "") + self._close(closed_item_status(self.reason))
        response = self._response("completed")
        events.append(self._event(f"response.{response['status']}", response=response))
        return events

    def error_event(self, body: dict[str, Any]) -> dict[str, Any]:
        """An in-stream error event: OpenAI's `error` event fields plus the `error` object."""
        error = body["error"]
        return self._event(
            "error", code=error.get("code"), message=error.get("message"), param=error.get("param"), error=error
        )
