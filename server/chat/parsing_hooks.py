"""The tool-call and reasoning parsers the chat path uses, as one replaceable object.

By default they come from `protoserve.server.parsing` (imported when first needed); tests hand the
servicer their own. Keeping them behind this seam lets the chat path be tested without depending on
any one parser's details.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from protoserve.server.chat.composer import ReasoningParser, ToolCallParser


@dataclass(frozen=True)
class ChatParsing:
    """Parser factories and detectors. Signatures follow `protoserve.server.parsing`."""

    detect_tool_parser: Callable[[str | None], str | None]
    """The tool-call format a chat template writes, by parser name, or None when unknown."""

    create_tool_parser: Callable[[str, Sequence[dict[str, Any]]], ToolCallParser]
    """A fresh streaming parser of that format for one choice, knowing the offered tools."""

    forced_tool_call_grammar: Callable[..., str]
    """`(parser_name, tools, function_name, *, allow_parallel)`: a Lark grammar that admits only tool
    calls in that format (to the named function, if given; several only when `allow_parallel`)."""

    detect_reasoning: Callable[[str | None, Any], Any | None]
    """The reasoning format of a chat template and tokenizer, or None when the model does not reason."""

    create_reasoning_parser: Callable[[Any, bool], ReasoningParser]
    """A fresh reasoning splitter for one choice; the flag says the output starts inside reasoning."""

    prompt_opens_reasoning: Callable[[Any, str], bool]
    """Whether a prompt (its last characters are given) ends inside an open reasoning section,
    as templates that add `<think>` to the generation prompt do."""

    write_tool_calls: Callable[[str, Sequence[tuple[str, Any]]], str] = field(
        default_factory=lambda: _default_write_tool_calls
    )
    """`(parser_name, [(name, arguments), ...])`: calls written in that format, for templates that
    show neither the tools nor earlier calls themselves (see `protoserve.server.chat.tool_prompt`)."""


def prompt_ends_inside_tags(start_tag: str | None, end_tag: str | None, prompt_tail: str) -> bool:
    """True when the last start tag in the prompt's tail is not followed by an end tag."""
    if not start_tag:
        return False
    start = prompt_tail.rfind(start_tag)
    if start < 0:
        return False
    return not end_tag or prompt_tail.find(end_tag, start + len(start_tag)) < 0


def _default_write_tool_calls(parser_name: str, calls: Sequence[tuple[str, Any]]) -> str:
    from protoserve.server.parsing.tool_call_formats import write_tool_calls

    return write_tool_calls(parser_name, calls)


def _default_prompt_opens_reasoning(reasoning_format: Any, prompt_tail: str) -> bool:
    return prompt_ends_inside_tags(reasoning_format.start, reasoning_format.end, prompt_tail)


def default_chat_parsing() -> ChatParsing:
    """The parsers of `protoserve.server.parsing`."""
    from protoserve.server.parsing import reasoning, tool_calls

    return ChatParsing(
        detect_tool_parser=tool_calls.detect_tool_parser,
        create_tool_parser=tool_calls.create_tool_parser,
        forced_tool_call_grammar=tool_calls.forced_tool_call_grammar,
        detect_reasoning=reasoning.detect_reasoning,
        create_reasoning_parser=reasoning.ReasoningStreamParser,
        prompt_opens_reasoning=_default_prompt_opens_reasoning,
    )
