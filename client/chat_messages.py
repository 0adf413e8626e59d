"""Conversation pieces from plain Python values to protobuf: messages, tools and tool choice.

Messages are OpenAI-shaped dicts (`{"role": "user", "content": "hi"}`; content may be a list of
parts: `{"type": "text", "text": ...}`, `{"type": "image_url", "image_url": {"url": ...}}`,
`{"type": "image", "data": b"..."}` or `{"type": "image", "url": ...}`; a bare `str` part is text and
bare `bytes` an image) or `protoserve.v1.generation_pb2.ChatMessage` objects, passed through.
Anything else raises `InvalidArgument` naming the message and what was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2
from protoserve.client.errors import InvalidArgument
from protoserve.v1 import generation_pb2

ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "reasoning"}
_TOOL_CHOICE_MODES = {
    "auto": generation_pb2.ToolChoice.MODE_AUTO,
    "none": generation_pb2.ToolChoice.MODE_NONE,
    "required": generation_pb2.ToolChoice.MODE_REQUIRED,
}


def to_struct(value: Any, what: str) -> struct_pb2.Struct:
    """A JSON object (dict) as a protobuf Struct; `what` names the value in errors."""
    if isinstance(value, struct_pb2.Struct):
        return value
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    struct = struct_pb2.Struct()
    try:
        struct.update(json.loads(json.dumps(value)))
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"{what} is not valid JSON: {error}") from None
    return struct


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    return value


def _image_part(data: Any, url: Any, detail: Any, where: str) -> generation_pb2.ContentPart:
    detail_text = _require_str(detail or "", f"{where} detail")
    if data is not None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgument(f"{where} image data must be bytes, got {type(data).__name__}")
        image = generation_pb2.Image(data=bytes(data), detail=detail_text)
    elif url is not None:
        image = generation_pb2.Image(url=_require_str(url, f"{where} image url"), detail=detail_text)
    else:
        raise InvalidArgument(f"{where} is an image part without data or url")
    return generation_pb2.ContentPart(image=image)


def to_content_part(part: Any, where: str) -> generation_pb2.ContentPart:
    """One content part: text, an image by bytes, or an image by URL (data: or http(s))."""
    if isinstance(part, generation_pb2.ContentPart):
        return part
    if isinstance(part, str):
        return generation_pb2.ContentPart(text=part)
    if isinstance(part, bytes | bytearray | memoryview):
        return _image_part(part, None, "", where)
    if not isinstance(part, Mapping):
        raise InvalidArgument(f"{where} must be a str, bytes or a dict part, got {type(part).__name__}")
    part_type = part.get("type")
    if part_type == "text":
        return generation_pb2.ContentPart(text=_require_str(part.get("text"), f"{where} text"))
    if part_type == "image_url":
        image_url = part.get("image_url")
        if isinstance(image_url, str):
            return _image_part(None, image_url, "", where)
        if not isinstance(image_url, Mapping):
            raise InvalidArgument(f"{where} image_url must be a URL string or {{'url': ...}}")
        return _image_part(None, image_url.get("url"), image_url.get("detail"), where)
    if part_type == "image":
        data, url = part.get("data"), part.get("url")
        image = part.get("image")  # {"type": "image", "image": bytes or URL}, as some SDKs write it
        if isinstance(image, str):
            url = url if url is not None else image
        elif image is not None:
            data = data if data is not None else image
        return _image_part(data, url, part.get("detail"), where)
    raise InvalidArgument(f"{where} has unknown type {part_type!r}; expected 'text', 'image_url' or 'image'")


def to_tool_call(call: Any, where: str) -> generation_pb2.ToolCall:
    """An assistant's earlier tool call, OpenAI-shaped (`arguments` as JSON text or a dict)."""
    if isinstance(call, generation_pb2.ToolCall):
        return call
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise InvalidArgument(f"{where} must be a dict like {{'id': ..., 'function': {{'name', 'arguments'}}}}")
    function = call["function"]
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(to_struct_dict(arguments, f"{where} arguments"))
    return generation_pb2.ToolCall(
        id=_require_str(call.get("id", ""), f"{where} id"),
        type=_require_str(call.get("type") or "function", f"{where} type"),
        function=generation_pb2.FunctionCall(
            name=_require_str(function.get("name"), f"{where} function name"), arguments=arguments
        ),
    )


def to_struct_dict(value: Any, what: str) -> dict[str, Any]:
    """A JSON-serialisable dict, checked."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be JSON text or a dict, got {type(value).__name__}")
    try:
        return dict(json.loads(json.dumps(value)))
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"{what} is not valid JSON: {error}") from None


def to_chat_message(message: Any, position: int) -> generation_pb2.ChatMessage:
    """One message of a conversation; `position` names it in errors."""
    if isinstance(message, generation_pb2.ChatMessage):
        return message
    where = f"message {position}"
    if not isinstance(message, Mapping):
        raise InvalidArgument(
            f"{where} must be a dict like {{'role': 'user', 'content': 'hi'}} or a ChatMessage,"
            f" got {type(message).__name__}"
        )
    unknown = sorted(str(key) for key, value in message.items() if key not in _MESSAGE_KEYS and value is not None)
    if unknown:
        raise InvalidArgument(f"{where} has unknown keys {unknown}; known: {sorted(_MESSAGE_KEYS)}")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidArgument(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None:
        parts: list[generation_pb2.ContentPart] = []
    elif isinstance(content, str):
        parts = [generation_pb2.ContentPart(text=content)]
    elif isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        parts = [to_content_part(part, f"{where} part {index}") for index, part in enumerate(content)]
    else:
        raise InvalidArgument(f"{where} content must be a string or a list of parts, got {type(content).__name__}")
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str):
        raise InvalidArgument(f"{where} tool_calls must be a list")
    reasoning = message.get("reasoning_content", message.get("reasoning")) or ""
    return generation_pb2.ChatMessage(
        role=role,
        content=parts,
        name=_require_str(message.get("name") or "", f"{where} name"),
        tool_calls=[to_tool_call(call, f"{where} tool call {index}") for index, call in enumerate(tool_calls)],
        tool_call_id=_require_str(message.get("tool_call_id") or "", f"{where} tool_call_id"),
        reasoning_content=_require_str(reasoning, f"{where} reasoning_content"),
    )


def to_chat_messages(messages: Any) -> list[generation_pb2.ChatMessage]:
    """A whole conversation; it must be a non-empty list."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise InvalidArgument("messages must be a list of messages, e.g. [{'role': 'user', 'content': 'hi'}]")
    if not messages:
        raise InvalidArgument("messages must not be empty")
    return [to_chat_message(message, position) for position, message in enumerate(messages)]


def to_tool(tool: Any, position: int) -> generation_pb2.Tool:
    """An OpenAI tool: `{"type": "function", "function": {"name", "description", "parameters"}}`."""
    if isinstance(tool, generation_pb2.Tool):
        return tool
    where = f"tool {position}"
    if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
        raise InvalidArgument(
            f"{where} must be a dict like {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}"
        )
    if tool.get("type", "function") != "function":
        raise InvalidArgument(f"{where} has type {tool.get('type')!r}; only 'function' tools exist")
    function = tool["function"]
    definition = generation_pb2.FunctionDefinition(
        name=_require_str(function.get("name"), f"{where} name"),
        description=_require_str(function.get("description") or "", f"{where} description"),
        strict=bool(function.get("strict", False)),
    )
    if function.get("parameters") is not None:
        definition.parameters.CopyFrom(to_struct(function["parameters"], f"{where} parameters"))
    return generation_pb2.Tool(type="function", function=definition)


def to_tools(tools: Any) -> list[generation_pb2.Tool]:
    if tools is None:
        return []
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidArgument("tools must be a list of tools")
    return [to_tool(tool, position) for position, tool in enumerate(tools)]


def to_tool_choice(tool_choice: Any) -> generation_pb2.ToolChoice | None:
    """'auto', 'none', 'required', `{"type": "function", "function": {"name": ...}}`, or a ToolChoice."""
    if tool_choice is None or isinstance(tool_choice, generation_pb2.ToolChoice):
        return tool_choice
    if isinstance(tool_choice, str):
        if tool_choice not in _TOOL_CHOICE_MODES:
            raise InvalidArgument(
                f"tool_choice {tool_choice!r} is not one of 'auto', 'none', 'required'"
                " (name a function with {'type': 'function', 'function': {'name': ...}})"
            )
        return generation_pb2.ToolChoice(mode=_TOOL_CHOICE_MODES[tool_choice])
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(function, Mapping):
        raise InvalidArgument("tool_choice must be a mode string or {'type': 'function', 'function': {'name': ...}}")
    return generation_pb2.ToolChoice(function_name=_require_str(function.get("name"), "tool_choice function name"))
