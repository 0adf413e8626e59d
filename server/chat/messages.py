"""Chat messages from the proto into the plain dicts chat templates read, with validation.

What templates receive, per message: `role`; `content` as a string for text-only messages (text
parts joined with newlines) or, when the message holds images, a list of `{"type": "text", "text"}`
and `{"type": "image"}` parts in order; and when present `name`, `tool_calls` (arguments parsed
from JSON into an object when they are valid JSON nested at most `MAX_ARGUMENTS_DEPTH` deep, as
templates expect; otherwise the raw text), `tool_call_id` and `reasoning_content`. The "developer"
role is given to templates as "system", which every template knows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.limits import RequestLimits
from protoserve.v1 import generation_pb2

ROLES = ("system", "developer", "user", "assistant", "tool")
TEMPLATE_ROLE = {"developer": "system"}
# Deeper tool call arguments reach the template as raw text: rendering walks them recursively.
MAX_ARGUMENTS_DEPTH = 64


@dataclass(frozen=True)
class Conversation:
    """A validated conversation: template-ready messages and the image sources, in order of appearance."""

    messages: list[dict[str, Any]]
    image_sources: list[bytes | str]
    text_chars: int  # characters across all messages: text, reasoning, names, ids and tool calls' names and arguments


def _image_source(image: generation_pb2.Image, where: str) -> bytes | str:
    kind = image.WhichOneof("source")
    if kind == "data":
        return image.data
    if kind == "url":
        return image.url
    raise InvalidRequestError(f"{where}.image has neither data nor url; set one of them")


def _nesting_depth(value: Any) -> int:
    """How many levels of objects and arrays `value` nests (without recursing, as the value may be deep)."""
    depth, level = 0, [value]
    while level := [item for item in level if isinstance(item, dict | list)]:
        depth += 1
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def _tool_calls(message: generation_pb2.ChatMessage, where: str) -> list[dict[str, Any]]:
    calls = []
    for position, call in enumerate(message.tool_calls):
        if call.type not in ("", "function"):
            raise InvalidRequestError(f"{where}.tool_calls[{position}].type is {call.type!r}; only 'function' is known")
        if not call.function.name:
            raise InvalidRequestError(f"{where}.tool_calls[{position}].function.name is empty")
        arguments: Any = call.function.arguments
        try:
            parsed = json.loads(arguments) if arguments else {}
        except (json.JSONDecodeError, RecursionError):
            parsed = None  # earlier model output may be malformed or absurdly nested; the template gets the raw text
        if isinstance(parsed, dict) and _nesting_depth(parsed) <= MAX_ARGUMENTS_DEPTH:
            arguments = parsed
        calls.append(
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}
        )
    return calls


def _message(
    message: generation_pb2.ChatMessage, position: int, limits: RequestLimits
) -> tuple[dict[str, Any], list[bytes | str], int]:
    where = f"messages[{position}]"
    if message.role not in ROLES:
        raise InvalidRequestError(f"{where}.role is {message.role!r}; use one of {', '.join(ROLES)}")
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    images: list[bytes | str] = []
    for part_position, part in enumerate(message.content):
        part_where = f"{where}.content[{part_position}]"
        kind = part.WhichOneof("part")
        if kind == "text":
            texts.append(part.text)
            parts.append({"type": "text", "text": part.text})
        elif kind == "image":
            if message.role != "user":
                raise InvalidRequestError(
                    f"{part_where} is an image in a {message.role!r} message; only user messages may hold images"
                )
            images.append(_image_source(part.image, part_where))
            parts.append({"type": "image"})
        else:
            raise InvalidRequestError(f"{part_where} has neither text nor image")
    text_chars = sum(len(text) for text in texts)
    if text_chars > limits.max_message_chars:
        raise InvalidRequestError(
            f"{where} has {text_chars} characters of text; at most {limits.max_message_chars} allowed"
        )

    converted: dict[str, Any] = {"role": TEMPLATE_ROLE.get(message.role, message.role)}
    converted["content"] = parts if images else "\n".join(texts)
    tool_calls = _tool_calls(message, where)
    if tool_calls:
        if message.role != "assistant":
            raise InvalidRequestError(
                f"{where} has tool_calls but its role is {message.role!r}; only assistant messages make tool calls"
            )
        converted["tool_calls"] = tool_calls
    if message.name:
        converted["name"] = message.name
    if message.role == "tool":
        if not message.tool_call_id:
            raise InvalidRequestError(
                f"{where} is a tool message without tool_call_id; give the id of the call it answers"
            )
        converted["tool_call_id"] = message.tool_call_id
    elif message.tool_call_id:
        raise InvalidRequestError(
            f"{where} has tool_call_id but its role is {message.role!r}; only tool messages answer calls"
        )
    if message.reasoning_content:
        converted["reasoning_content"] = message.reasoning_content

    has_text = any(texts)
    if not (has_text or images or tool_calls or message.reasoning_content or message.role == "tool"):
        raise InvalidRequestError(f"{where} ({message.role}) is empty; give it text, an image or tool calls")
    return converted, images, text_chars + _extra_chars(message)


def _extra_chars(message: generation_pb2.ChatMessage) -> int:
    """The characters of a message's fields besides its text parts that reach the template."""
    calls = sum(len(call.id) + len(call.function.name) + len(call.function.arguments) for call in message.tool_calls)
    return len(message.reasoning_content) + len(message.name) + len(message.tool_call_id) + calls


def conversation_from_proto(
    messages: Sequence[generation_pb2.ChatMessage], limits: RequestLimits, *, images_allowed: bool
) -> Conversation:
    """Validate and convert a conversation. `images_allowed` is False for models without an image modality."""
    if not messages:
        raise InvalidRequestError("messages is empty; a chat request needs at least one message")
    if len(messages) > limits.max_messages:
        raise InvalidRequestError(f"messages has {len(messages)} entries; at most {limits.max_messages} allowed")
    converted: list[dict[str, Any]] = []
    image_sources: list[bytes | str] = []
    total_chars = 0
    for position, message in enumerate(messages):
        template_message, images, chars = _message(message, position, limits)
        converted.append(template_message)
        image_sources.extend(images)
        total_chars += chars
    if image_sources and not images_allowed:
        raise InvalidRequestError("this model takes text only; remove the image parts or choose a vision model")
    if len(image_sources) > limits.max_images:
        raise InvalidRequestError(
            f"the conversation has {len(image_sources)} images; at most {limits.max_images} allowed"
        )
    if total_chars > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"the conversation has {total_chars} characters of text; at most {limits.max_prompt_chars} allowed"
        )
    return Conversation(messages=converted, image_sources=image_sources, text_chars=total_chars)
