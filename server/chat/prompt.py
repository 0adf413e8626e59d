"""A chat request turned into the engine's prompt, plus what is needed to read the model's reply.

Order of work, cheapest checks first: the conversation, tools and template kwargs are validated;
the template is rendered (in a worker thread, time-capped); a conversation with images is checked
against the context length before any image is loaded, then its images are loaded and processed.
For a reasoning model, the template is also rendered as text with and without the generation prompt:
only what the generation prompt adds decides whether the reply starts inside a reasoning section.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protoserve.server.chat.composer import ChoiceComposer
from protoserve.server.chat.images import load_images, processed_prompt
from protoserve.server.chat.messages import conversation_from_proto
from protoserve.server.chat.parsing_hooks import ChatParsing
from protoserve.server.chat.template import (
    check_template_kwargs,
    generation_prompt_suffix,
    render_text,
    render_token_ids,
    require_chat_template,
)
from protoserve.server.chat.tool_prompt import conversation_with_tool_prompt
from protoserve.server.chat.tools import ToolPlan, resolve_tool_parser_name, tool_plan_from_request
from protoserve.server.convert import struct_to_python
from protoserve.server.engine.api import MultimodalInputs
from protoserve.server.limits import RequestLimits
from protoserve.v1 import generation_pb2

# How many prompt tokens are decoded to see whether the generation prompt opened a reasoning section,
# when what the generation prompt adds cannot be told apart from the conversation (see
# `generation_prompt_suffix`).
REASONING_TAIL_TOKENS = 16


@dataclass(frozen=True)
class ChatPrompt:
    """The engine prompt of a chat request and how to parse each choice of its reply."""

    token_ids: list[int]
    multimodal: MultimodalInputs | None
    tool_plan: ToolPlan
    tool_parser_name: str | None  # set when the output is parsed for tool calls
    forced_tool_grammar: str | None  # set for tool_choice required / named
    reasoning_format: Any | None
    starts_inside_reasoning: bool

    def new_composer(self, parsing: ChatParsing | None) -> ChoiceComposer:
        """A fresh composer for one choice."""
        if parsing is None:
            return ChoiceComposer()
        reasoning_parser = (
            parsing.create_reasoning_parser(self.reasoning_format, self.starts_inside_reasoning)
            if self.reasoning_format is not None
            else None
        )
        tool_parser = (
            parsing.create_tool_parser(self.tool_parser_name, self.tool_plan.tools)
            if self.tool_parser_name is not None
            else None
        )
        return ChoiceComposer(
            reasoning_parser=reasoning_parser,
            tool_parser=tool_parser,
            parallel_tool_calls=self.tool_plan.parallel_tool_calls,
        )


def model_takes_images(served: Any) -> bool:
    return "image" in tuple(served.description.modalities) and getattr(served.loaded, "processor", None) is not None


async def prepare_chat_prompt(
    request: generation_pb2.ChatRequest,
    served: Any,
    *,
    limits: RequestLimits,
    image_policy: Any,
    parsing: ChatParsing | None,
    tool_parser_setting: str,
    check_prompt_length: Callable[[int], None],
) -> ChatPrompt:
    """Render and tokenize a conversation. `parsing` is None when no reply will be parsed (Tokenize).

    `check_prompt_length(prompt_tokens)` raises when the prompt leaves no room for the output; it is
    called before images are loaded (with image placeholders counted as one token each) and again
    by the caller on the final prompt.
    """
    loaded = served.loaded
    model_id = served.description.id
    tokenizer = loaded.tokenizer
    processor = getattr(loaded, "processor", None)
    template = require_chat_template(tokenizer, processor, model_id)
    conversation = conversation_from_proto(request.messages, limits, images_allowed=model_takes_images(served))

    plan = tool_plan_from_request(request, limits)
    tool_parser_name = None
    if plan.parses_output and parsing is not None:
        detected = parsing.detect_tool_parser(template)
        tool_parser_name = resolve_tool_parser_name(plan, tool_parser_setting, detected, model_id)
    template_kwargs: dict[str, Any] = {}
    if request.HasField("chat_template_kwargs"):
        template_kwargs = check_template_kwargs(
            struct_to_python(request.chat_template_kwargs, "chat_template_kwargs"), limits, template
        )
    template_tools = plan.tools if plan.shows_tools else None
    messages = conversation.messages
    if tool_parser_name is not None and parsing is not None:
        messages = conversation_with_tool_prompt(
            messages, template_tools or [], template, tool_parser_name, parsing.write_tool_calls
        )

    multimodal = None
    if conversation.image_sources:
        text = await render_text(
            tokenizer,
            template,
            messages,
            tools=template_tools,
            template_kwargs=template_kwargs,
            limits=limits,
        )
        placeholder_ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)
        check_prompt_length(len(placeholder_ids))
        images = await load_images(conversation.image_sources, image_policy, limits)
        processed = await processed_prompt(
            processor,
            template,
            messages,
            images,
            tools=template_tools,
            template_kwargs=template_kwargs,
            limits=limits,
        )
        token_ids, multimodal = processed.token_ids, processed.multimodal
    else:
        token_ids = await render_token_ids(
            tokenizer,
            template,
            messages,
            tools=template_tools,
            template_kwargs=template_kwargs,
            limits=limits,
        )

    reasoning_format = parsing.detect_reasoning(template, tokenizer) if parsing is not None else None
    starts_inside = False
    if reasoning_format is not None and parsing is not None:
        opened_by = await generation_prompt_suffix(
            tokenizer, template, messages, tools=template_tools, template_kwargs=template_kwargs, limits=limits
        )
        if opened_by is None:
            opened_by = tokenizer.decode(token_ids[-REASONING_TAIL_TOKENS:], skip_special_tokens=False)
        starts_inside = parsing.prompt_opens_reasoning(reasoning_format, opened_by)
    forced_grammar = None
    if plan.forces_call and parsing is not None and tool_parser_name is not None:
        forced_grammar = parsing.forced_tool_call_grammar(
            tool_parser_name, plan.tools, plan.function_name, allow_parallel=plan.parallel_tool_calls
        )
    return ChatPrompt(
        token_ids=token_ids,
        multimodal=multimodal,
        tool_plan=plan,
        tool_parser_name=tool_parser_name,
        forced_tool_grammar=forced_grammar,
        reasoning_format=reasoning_format,
        starts_inside_reasoning=starts_inside,
    )
