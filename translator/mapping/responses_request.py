"""POST /v1/responses body -> ChatRequest (pure). The translator is stateless: the whole conversation
comes in `input` (a string, or a list of messages and function-call items); `previous_response_id`
is refused with a clear 400."""

from __future__ import annotations

from typing import Any

from protoserve.translator.errors import invalid_request
from protoserve.translator.mapping.chat_request import ROLES
from protoserve.translator.mapping.content import content_parts
from protoserve.translator.mapping.fields import Fields, as_list
from protoserve.translator.mapping.images import ImageBudget
from protoserve.translator.mapping.request_options import request_options
from protoserve.translator.mapping.sampling import json_schema_format, sampling_params
from protoserve.translator.mapping.tools import tool_choice, tools
from protoserve.v1.common_pb2 import ResponseFormat
from protoserve.v1.generation_pb2 import ChatMessage, ChatRequest, ContentPart, FunctionCall, ToolCall


def _function_call(item: Fields) -> ToolCall:
    return ToolCall(
        id=item.string("call_id"),
        type="function",
        function=FunctionCall(name=item.string("name"), arguments=item.optional_string("arguments") or "{}"),
    )


def _function_output(item: Fields) -> ChatMessage:
    return ChatMessage(
        role="tool", tool_call_id=item.string("call_id"), content=[ContentPart(text=item.string("output"))]
    )


def input_messages(value: Any, images: ImageBudget) -> list[ChatMessage]:
    """`input` as chat messages; consecutive function_call items join one assistant message."""
    if isinstance(value, str):
        return [ChatMessage(role="user", content=[ContentPart(text=value)])]
    messages: list[ChatMessage] = []
    for index, raw in enumerate(as_list(value, "input")):
        item = Fields(raw, f"input[{index}]")
        kind = item.optional_string("type") or "message"
        if kind == "message":
            role = item.string("role")
            if role not in ROLES or role == "tool":
                raise invalid_request(
                    f"'{item.param('role')}' must be user, system, developer or assistant", param=item.param("role")
                )
            messages.append(
                ChatMessage(role=role, content=content_parts(item.get("content"), item.param("content"), images))
            )
        elif kind == "function_call":
            if not (messages and messages[-1].role == "assistant" and messages[-1].tool_calls):
                messages.append(ChatMessage(role="assistant"))
            messages[-1].tool_calls.append(_function_call(item))
        elif kind == "function_call_output":
            messages.append(_function_output(item))
        elif kind == "reasoning":
            continue  # earlier reasoning is not replayed to the model
        else:
            raise invalid_request(
                f"'{item.param('type')}': input items of type {kind!r} are not supported", param=item.param("type")
            )
    return messages


def _text_format(fields: Fields) -> ResponseFormat | None:
    text = fields.optional_object("text")
    format_fields = text.optional_object("format") if text is not None else None
    if format_fields is None:
        return None
    kind = format_fields.string("type")
    if kind == "text":
        return ResponseFormat(type=ResponseFormat.TYPE_TEXT)
    if kind == "json_object":
        return ResponseFormat(type=ResponseFormat.TYPE_JSON_OBJECT)
    if kind == "json_schema":
        return json_schema_format(format_fields)
    raise invalid_request(
        f"'{format_fields.param('type')}' must be text, json_object or json_schema", param=format_fields.param("type")
    )


def responses_chat_request(body: Any, request_id: str, images: ImageBudget) -> ChatRequest:
    """The ChatRequest for a Responses API body."""
    fields = Fields(body)
    if fields.has("previous_response_id"):
        raise invalid_request(
            "'previous_response_id' is not supported: the translator stores no responses; "
            "send the whole conversation in 'input'",
            param="previous_response_id",
        )
    messages = input_messages(fields.required("input"), images)
    instructions = fields.optional_string("instructions")
    if instructions:
        messages.insert(0, ChatMessage(role="system", content=[ContentPart(text=instructions)]))
    if not messages:
        raise invalid_request("'input' must hold at least one item", param="input")
    request = ChatRequest(
        model=fields.optional_string("model") or "",
        messages=messages,
        sampling=sampling_params(fields, ("max_output_tokens",)),
        options=request_options(fields, request_id),
    )
    request.sampling.ClearField("n")  # the Responses API has one output: more choices would be generated unseen
    text_format = _text_format(fields)
    if text_format is not None:
        request.sampling.response_format.CopyFrom(text_format)
    if fields.has("tools"):
        request.tools.extend(tools(fields.get("tools"), "tools", flat=True))
    if fields.has("tool_choice"):
        request.tool_choice.CopyFrom(tool_choice(fields.get("tool_choice"), "tool_choice"))
    parallel_tool_calls = fields.optional_bool("parallel_tool_calls")
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = parallel_tool_calls
    return request


def request_echo(body: dict[str, Any]) -> dict[str, Any]:
    """The request settings a Response object repeats back (instructions, tools, sampling...)."""
    fields = Fields(body)
    return {
        "instructions": fields.optional_string("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "text": body.get("text") or {"format": {"type": "text"}},
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "user": fields.optional_string("user"),
    }
