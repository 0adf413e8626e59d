"""Tools for models whose chat template does not show them (SmolLM2 and many small models).

A template that never reads the `tools` variable renders a prompt without the tools, so the model
cannot know they exist, nor how to call them. For such a template, the conversation sent to it gets
a short system text listing each tool's JSON definition and the exact call format the server parses
(appended to the conversation's system message, or as a new first system message). Likewise, a
template that never mentions `tool_calls` drops the calls of earlier assistant turns; those calls are
written into the assistant message's text in the same format, so the model sees what it called
before the tool results that follow.

Templates that do read `tools` (or mention `tool_calls`) are left to render them their own way.
The caller's messages are copied, never changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from protoserve.server.chat.template import template_variables

WriteToolCalls = Callable[[str, Sequence[tuple[str, Any]]], str]


def template_shows_tools(template: str) -> bool:
    """Whether the template reads the `tools` variable."""
    return "tools" in template_variables(template)


def template_shows_tool_calls(template: str) -> bool:
    """Whether the template reads assistant messages' `tool_calls` (a plain text check)."""
    return "tool_calls" in template


def tool_system_text(tools: Sequence[dict[str, Any]], parser_name: str, write_tool_calls: WriteToolCalls) -> str:
    """The system text that shows `tools` and how to call them in format `parser_name`."""
    definitions = "\n".join(json.dumps(tool) for tool in tools)
    example = write_tool_calls(parser_name, [("<function name>", {"<parameter>": "<value>"})])
    return (
        "You can call these tools; each is given as a JSON definition:\n"
        f"{definitions}\n"
        "To call a tool, reply with only the call, in exactly this format:\n"
        f"{example}"
    )


def _with_written_calls(message: dict[str, Any], parser_name: str, write_tool_calls: WriteToolCalls) -> dict[str, Any]:
    calls = message.get("tool_calls")
    content = message.get("content")
    if not calls or not isinstance(content, str):
        return message
    written = write_tool_calls(
        parser_name, [(call["function"]["name"], call["function"]["arguments"]) for call in calls]
    )
    return {**message, "content": f"{content}\n{written}" if content else written}


def conversation_with_tool_prompt(
    messages: list[dict[str, Any]],
    tools: Sequence[dict[str, Any]],
    template: str,
    parser_name: str,
    write_tool_calls: WriteToolCalls,
) -> list[dict[str, Any]]:
    """`messages` as the template should get them, given the tools shown (see the module docstring)."""
    updated = list(messages)
    if not template_shows_tool_calls(template):
        updated = [_with_written_calls(message, parser_name, write_tool_calls) for message in updated]
    if not tools or template_shows_tools(template):
        return updated
    text = tool_system_text(tools, parser_name, write_tool_calls)
    first = updated[0] if updated else None
    if first is not None and first.get("role") == "system" and isinstance(first.get("content"), str):
        content = first["content"]
        updated[0] = {**first, "content": f"{content}\n\n{text}" if content else text}
    else:
        updated.insert(0, {"role": "system", "content": text})
    return updated
