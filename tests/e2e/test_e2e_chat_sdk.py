"""Chat completions through the real translator and server, driven by the official openai SDK."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from e2e.stack import DemoStack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a robot."}]


@pytest.fixture(scope="module")
def client(demo_stack: DemoStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_stack.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def async_client(demo_stack: DemoStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=demo_stack.base_url, api_key="unused", max_retries=0, timeout=120)


def test_greedy_answer_names_paris(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    reply = client.chat.completions.create(model=demo_stack.chat_model, messages=QUESTION, temperature=0, max_tokens=12)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_async_stream_shape_with_usage(async_client: openai.AsyncOpenAI, demo_stack: DemoStack) -> None:
    stream = await async_client.chat.completions.create(
        model=demo_stack.chat_model,
        messages=QUESTION,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert len({chunk.id for chunk in chunks}) == 1, "every chunk carries the same id"
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1], "exactly one usage chunk, the last"
    assert chunks[-1].choices == []
    content_chunks = chunks[:-1]
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.choices[0].finish_reason is None for chunk in content_chunks[:-1])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in content_chunks)
    assert "Paris" in text
    assert usage_chunks[0].usage is not None and usage_chunks[0].usage.completion_tokens >= 1


def test_two_choices(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    reply = client.chat.completions.create(
        model=demo_stack.chat_model, messages=STORY, n=2, temperature=0.8, seed=3, max_tokens=8
    )
    assert sorted(choice.index for choice in reply.choices) == [0, 1]
    assert all(choice.message.content for choice in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens <= 16


def test_stop_string_ends_the_reply(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    reply = client.chat.completions.create(
        model=demo_stack.chat_model, messages=QUESTION, temperature=0, max_tokens=12, stop=[" Paris"]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == "The capital of France is"


def test_same_seed_same_text_stream_or_not(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    settings = {"model": demo_stack.chat_model, "messages": STORY, "temperature": 0.8, "seed": 1234, "max_tokens": 16}
    first = client.chat.completions.create(**settings).choices[0].message.content
    second = client.chat.completions.create(**settings).choices[0].message.content
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**settings, stream=True)
        if chunk.choices
    )
    other_seed = client.chat.completions.create(**{**settings, "seed": 99}).choices[0].message.content
    assert first and first == second == streamed
    assert other_seed != first, "a different seed should (for this prompt) give a different story"


def test_logprobs_and_top_logprobs(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    reply = client.chat.completions.create(
        model=demo_stack.chat_model, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
    assert content and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    for position in content:
        assert position.logprob <= 0.0 and len(position.top_logprobs) == 3
        alternatives = [alternative.logprob for alternative in position.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        assert position.logprob == pytest.approx(alternatives[0], abs=1e-4), "greedy picks the top token"
    assert "".join(position.token for position in content).startswith("The capital")


def test_json_schema_reply_validates(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "is_capital": {"type": "boolean"}},
        "required": ["city", "is_capital"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=demo_stack.chat_model,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_models_list_and_retrieve(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    listed = {model.id for model in client.models.list()}
    assert listed == {demo_stack.chat_model, demo_stack.speech_model, demo_stack.vision_model}
    assert client.models.retrieve(demo_stack.chat_model).id == demo_stack.chat_model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
    assert "no-such-model" in str(caught.value)


def test_prompt_too_long_names_both_numbers(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    context_length = 8192
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=demo_stack.chat_model,
            messages=[{"role": "user", "content": "hello " * (context_length + 100)}],
            max_tokens=8,
        )
    message = str(caught.value)
    numbers = {int(number) for number in re.findall(r"\d+", message)}
    assert context_length in numbers
    assert any(number > context_length for number in numbers), message


@pytest.mark.parametrize(
    "bad_settings",
    [{"temperature": 7.5}, {"top_p": 0.0}, {"n": 1000}, {"top_logprobs": 50, "logprobs": True}, {"max_tokens": -3}],
    ids=["temperature", "top_p", "n", "top_logprobs", "max_tokens"],
)
def test_bad_parameters_are_bad_requests(
    client: openai.OpenAI, demo_stack: DemoStack, bad_settings: dict[str, object]
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=demo_stack.chat_model, messages=QUESTION, **bad_settings)  # type: ignore[call-overload]
    assert caught.value.status_code == 400
    assert "Traceback" not in str(caught.value)
