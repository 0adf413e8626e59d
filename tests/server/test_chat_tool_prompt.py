"""The tool prompt for chat templates that show neither tools nor earlier tool calls."""

from __future__ import annotations

import copy
from typing import Any

from protoserve.server.chat.tool_prompt import (
    conversation_with_tool_prompt,
    template_shows_tool_calls,
    template_shows_tools,
)
from protoserve.server.parsing.tool_call_formats import write_tool_calls

PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
WITH_TOOLS = "{% if tools %}{{ tools | tojson }}{% endif %}" + PLAIN
WITH_CALLS = "{% for m in messages %}{{ m.tool_calls }}{% endfor %}"
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
]


def test_what_a_template_shows() -> None:
    assert not template_shows_tools(PLAIN) and template_shows_tools(WITH_TOOLS)
    assert not template_shows_tool_calls(PLAIN) and template_shows_tool_calls(WITH_CALLS)


def test_a_system_message_is_added_first_when_there_is_none() -> None:
    messages = [{"role": "user", "content": "hi"}]
    before = copy.deepcopy(messages)
    updated = conversation_with_tool_prompt(messages, TOOLS, PLAIN, "hermes", write_tool_calls)
    assert messages == before
    assert updated[1:] == messages and updated[0]["role"] == "system"
    assert '{"type": "function", "function": {"name": "add"' in updated[0]["content"]
    assert updated[0]["content"].endswith('<tool_call>\n{"name": "<function name>", "arguments": '
                                          '{"<parameter>": "<value>"}}\n</tool_call>')  # fmt: skip


def test_the_tools_join_an_existing_system_message_in_the_parsers_format() -> None:
    for content, start in (("Be brief.", "Be brief.\n\nYou can call"), ("", "You can call")):
        messages = [{"role": "system", "content": content}, {"role": "user", "content": "hi"}]
        updated = conversation_with_tool_prompt(messages, TOOLS, PLAIN, "mistral", write_tool_calls)
        assert len(updated) == 2 and updated[0]["content"].startswith(start)
        assert "[TOOL_CALLS][" in updated[0]["content"]


def test_templates_that_show_tools_or_calls_are_left_alone() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    assert conversation_with_tool_prompt(messages, TOOLS, WITH_TOOLS + WITH_CALLS, "hermes", write_tool_calls) == (
        messages
    )
    assert conversation_with_tool_prompt(messages, [], WITH_CALLS, "hermes", write_tool_calls) == messages


def test_earlier_calls_are_written_into_the_assistant_text() -> None:
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}},
        {"id": "c2", "type": "function", "function": {"name": "add", "arguments": "{not json"}},
    ]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Sure.", "tool_calls": calls},
    ]
    updated = conversation_with_tool_prompt(messages, [], PLAIN, "llama3", write_tool_calls)
    assert (
        updated[1]["content"]
        == 'Sure.\n{"name": "add", "parameters": {"a": 1}};{"name": "add", "parameters": "{not json"}'
    )
    assert messages[1]["content"] == "Sure."
