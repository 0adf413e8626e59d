"""chat/prompt.py: whether a reply starts inside a reasoning section is read from the generation
prompt only, never from the conversation's own text."""

from __future__ import annotations

import copy
from typing import Any

from protoserve.server.chat.prompt import prepare_chat_prompt
from protoserve.server.chat.template import generation_prompt_suffix
from protoserve.server.limits import RequestLimits
from protoserve.v1 import generation_pb2 as pb

try:
    from .generation_fakes import (
        CHAT_TEMPLATE,
        FakeEngine,
        fake_chat_parsing,
        served_model,
        start_server,
        stop_server,
        text_script,
        tiny_tokenizer,
    )
except ImportError:
    from generation_fakes import (  # type: ignore[no-redef]
        CHAT_TEMPLATE,
        FakeEngine,
        fake_chat_parsing,
        served_model,
        start_server,
        stop_server,
        text_script,
        tiny_tokenizer,
    )

LIMITS = RequestLimits()


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role="user", content=[pb.ContentPart(text=text)])


def tool_exchange(result: str) -> list[pb.ChatMessage]:
    call = pb.ToolCall(id="c1", type="function", function=pb.FunctionCall(name="lookup", arguments="{}"))
    return [
        user("look it up"),
        pb.ChatMessage(role="assistant", tool_calls=[call]),
        pb.ChatMessage(role="tool", content=[pb.ContentPart(text=result)], tool_call_id="c1", name="lookup"),
    ]


async def reply(messages: list[pb.ChatMessage], *, enable_thinking: bool = False) -> tuple[str, str]:
    """(reasoning_text, text) of a model that answers "Hello there" (then "</think>Done" if thinking)."""
    pieces = ["Hello", " there"] + (["</think>", "Done"] if enable_thinking else [])
    running = await start_server(FakeEngine(script=text_script([pieces])))
    try:
        request = pb.ChatRequest(messages=messages)
        if enable_thinking:
            request.chat_template_kwargs.update({"enable_thinking": True})
        choice = (await running.stub.ChatUnary(request)).choices[0]
    finally:
        await stop_server(running)
    return choice.reasoning_text, choice.text


async def test_a_think_tag_in_user_text_does_not_open_reasoning() -> None:
    assert await reply([user("What does <think> mean? <think>")]) == ("", "Hello there")
    assert await reply([user("<think>")]) == ("", "Hello there")


async def test_a_think_tag_in_a_tool_result_does_not_open_reasoning() -> None:
    assert await reply(tool_exchange('{"note": "<think>"} <think>\n')) == ("", "Hello there")


async def test_a_generation_prompt_that_opens_think_still_starts_inside() -> None:
    assert await reply([user("capital?")], enable_thinking=True) == ("Hello there", "Done")
    assert await reply([user("a </think> in user text")], enable_thinking=True) == ("Hello there", "Done")


async def test_the_generation_prompt_suffix_is_what_the_generation_prompt_adds() -> None:
    tokenizer = tiny_tokenizer()
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi <think>"}]
    suffix = await generation_prompt_suffix(
        tokenizer, CHAT_TEMPLATE, messages, tools=None, template_kwargs={"enable_thinking": True}, limits=LIMITS
    )
    assert suffix == "<|im_start|>assistant\n<think>\n"
    suffix = await generation_prompt_suffix(
        tokenizer, CHAT_TEMPLATE, messages, tools=None, template_kwargs={}, limits=LIMITS
    )
    assert suffix == "<|im_start|>assistant\n"


# Renders the conversation differently without the generation prompt, so what the generation prompt
# adds cannot be told apart; its generation prompt always opens a reasoning section.
UNSPLITTABLE_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role + '\\n' + message.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% else %}<|endoftext|>{% endif %}"
)


async def test_without_a_separable_generation_prompt_the_prompt_tail_decides() -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer(with_template=False))
    tokenizer.chat_template = UNSPLITTABLE_TEMPLATE
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    assert (
        await generation_prompt_suffix(
            tokenizer, UNSPLITTABLE_TEMPLATE, messages, tools=None, template_kwargs={}, limits=LIMITS
        )
        is None
    )
    prompt = await prepare_chat_prompt(
        pb.ChatRequest(messages=[user("hi")]),
        served_model(FakeEngine(), tokenizer=tokenizer),
        limits=LIMITS,
        image_policy=None,
        parsing=fake_chat_parsing(),
        tool_parser_setting="auto",
        check_prompt_length=lambda prompt_tokens: None,
    )
    assert prompt.reasoning_format is not None and prompt.starts_inside_reasoning
