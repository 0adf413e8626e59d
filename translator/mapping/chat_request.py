"""POST /v1/chat/completions body -> ChatRequest (pure; raises ApiError 400 naming the field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protoserve.translator.errors import invalid_request
from protoserve.translator.mapping.content import content_parts
from protoserve.translator.mapping.fields import UINT32_MAX, Fields, as_list
from protoserve.translator.mapping.images import ImageBudget
from protoserve.translator.mapping.request_options import request_options
from protoserve.translator.mapping.sampling import response_format, sampling_params
from protoserve.translator.mapping.tools import tool_calls, tool_choice, tools
from protoserve.v1.generation_pb2 import ChatMessage, ChatRequest

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class StreamSettings:
    """How the reply is sent: as SSE chunks or one object, and with a usage chunk at the end."""

    stream: bool
    include_usage: bool


def chat_message(value: Any, param: str, images: ImageBudget) -> ChatMessage:
    """One OpenAI chat message."""
    fields = Fields(value, param)
    role = fields.string("role")
    if role not in ROLES:
        raise invalid_request(
            f"'{fields.param('role')}' must be one of {', '.join(ROLES)}, not {role!r}", param=fields.param("role")
        )
    message = ChatMessage(
        role=role,
        content=content_parts(fields.get("content"), fields.param("content"), images),
        name=fields.optional_string("name") or "",
        reasoning_content=fields.optional_string("reasoning_content") or fields.optional_string("reasoning") or "",
    )
    if fields.has("tool_calls"):
        message.tool_calls.extend(tool_calls(fields.get("tool_calls"), fields.param("tool_calls")))
    if role == "tool":
        message.tool_call_id = fields.string("tool_call_id")
    return message


def stream_settings(fields: Fields) -> StreamSettings:
    """`stream` and `stream_options.include_usage`."""
    stream = bool(fields.optional_bool("stream"))
    options = fields.optional_object("stream_options")
    include_usage = bool(options.optional_bool("include_usage")) if options is not None else False
    return StreamSettings(stream=stream, include_usage=include_usage)


def chat_request(body: Any, request_id: str, images: ImageBudget) -> ChatRequest:
    """The ChatRequest for a chat completions body. Unknown fields are ignored."""
    fields = Fields(body)
    messages = as_list(fields.required("messages"), "messages")
    if not messages:
        raise invalid_request("'messages' must hold at least one message", param="messages")
    request = ChatRequest(
        model=fields.optional_string("model") or "",
        messages=[chat_message(item, f"messages[{index}]", images) for index, item in enumerate(messages)],
        sampling=sampling_params(fields, ("max_completion_tokens", "max_tokens")),
        options=request_options(fields, request_id),
    )
    if fields.has("logprobs"):
        request.sampling.logprobs = bool(fields.optional_bool("logprobs"))
    request.sampling.top_logprobs = fields.optional_int("top_logprobs", 0, UINT32_MAX) or 0
    format_fields = fields.optional_object("response_format")
    if format_fields is not None:
        request.sampling.response_format.CopyFrom(response_format(format_fields))
    if fields.has("tools"):
        request.tools.extend(tools(fields.get("tools"), "tools"))
    if fields.has("tool_choice"):
        request.tool_choice.CopyFrom(tool_choice(fields.get("tool_choice"), "tool_choice"))
    parallel_tool_calls = fields.optional_bool("parallel_tool_calls")
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = parallel_tool_calls
    template_kwargs = fields.optional_struct("chat_template_kwargs")
    if template_kwargs is not None:
        request.chat_template_kwargs.CopyFrom(template_kwargs)
    return request
