"""Chat completions through the official openai SDK (sync and async) against the fake upstream."""

from __future__ import annotations

import asyncio
import json

import openai
from fake_upstream import CREATED, MODEL_ID, FakeUpstream, text_chunks, text_result
from protoserve.translator.server import RunningTranslator
from protoserve.v1 import common_pb2, generation_pb2


def async_client(translator: RunningTranslator) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{translator.url}/v1", api_key="unused", max_retries=0)


async def test_non_stream_chat_maps_request_and_reply(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    upstream.result = text_result("Hello there", choices=2)
    upstream.result.choices[0].reasoning_text = "thinking"
    client = async_client(translator)
    reply = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        n=2,
        temperature=0.5,
        max_completion_tokens=7,
        stop="END",
        seed=3,
        user="alice",
        extra_headers={"X-Request-Id": "req-123"},
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL_ID and reply.created == CREATED
    assert [choice.message.content for choice in reply.choices] == ["Hello there", "Hello there"]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.model_extra["reasoning_content"] == "thinking"
    assert reply.usage.prompt_tokens == 5 and reply.usage.prompt_tokens_details.cached_tokens == 1
    (request,) = upstream.requests_of("ChatUnary")
    assert [message.role for message in request.messages] == ["system", "user"]
    assert request.messages[1].content[0].text == "Hi"
    assert request.sampling.n == 2 and request.sampling.max_tokens == 7
    assert abs(request.sampling.temperature - 0.5) < 1e-6
    assert list(request.sampling.stop) == ["END"] and request.sampling.seed == 3
    assert request.options.request_id == "req-123" and request.options.user == "alice"
    assert upstream.metadata[0]["authorization"] == "Bearer upstream-secret"


async def test_stream_shape_include_usage_and_n(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    upstream.chunks = text_chunks(["Hel", "lo"], choices=2)
    client = openai.OpenAI(base_url=f"{translator.url}/v1", api_key="unused", max_retries=0)

    def collect() -> list[openai.types.chat.ChatCompletionChunk]:
        stream = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            n=2,
            stream_options={"include_usage": True},
        )
        return list(stream)

    chunks = await asyncio.to_thread(collect)
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {chunk.created for chunk in chunks} == {CREATED} and {chunk.model for chunk in chunks} == {MODEL_ID}
    for index in (0, 1):
        mine = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert "".join(choice.delta.content or "" for choice in mine) == "Hello"
        assert mine[-1].finish_reason == "stop"
        assert all(choice.finish_reason is None for choice in mine[:-1])
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert upstream.requests_of("Chat")[0].sampling.n == 2


async def test_stream_without_include_usage_has_no_usage_key(translator: RunningTranslator, http) -> None:
    async with http.post(
        f"{translator.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = await response.text()
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(event) for event in events[:-1]]
    assert all("usage" not in chunk for chunk in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_and_non_stream_give_the_same_text(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    upstream.chunks = text_chunks(["Hel", "lo", " world"])
    upstream.result = text_result("Hello world")
    client = async_client(translator)
    messages = [{"role": "user", "content": "Hi"}]
    whole = await client.chat.completions.create(model=MODEL_ID, messages=messages)
    streamed = await client.chat.completions.create(model=MODEL_ID, messages=messages, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in streamed if chunk.choices])
    assert text == whole.choices[0].message.content == "Hello world"


async def test_logprobs_in_chunks_and_reply(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    entry = common_pb2.TokenLogprob(
        token="Hi",
        token_id=5,
        logprob=-0.25,
        token_bytes=b"Hi",
        top_logprobs=[
            common_pb2.TopLogprob(token="Hi", token_id=5, logprob=-0.25),
            common_pb2.TopLogprob(token="Yo", token_id=6, logprob=-2.0),
        ],
    )
    upstream.chunks = text_chunks(["Hi"])
    upstream.chunks[0].choices[0].logprobs.append(entry)
    upstream.result = text_result("Hi")
    upstream.result.choices[0].logprobs.append(entry)
    client = async_client(translator)
    messages = [{"role": "user", "content": "Hi"}]
    reply = await client.chat.completions.create(model=MODEL_ID, messages=messages, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert content[0].token == "Hi" and content[0].logprob == -0.25 and content[0].bytes == [72, 105]
    assert [top.token for top in content[0].top_logprobs] == ["Hi", "Yo"]
    request = upstream.requests_of("ChatUnary")[0]
    assert request.sampling.logprobs and request.sampling.top_logprobs == 2
    streamed = await client.chat.completions.create(model=MODEL_ID, messages=messages, logprobs=True, stream=True)
    with_logprobs = [
        chunk.choices[0].logprobs async for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
    ]
    assert with_logprobs[0].content[0].top_logprobs[1].logprob == -2.0


async def test_streamed_tool_calls(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    first = generation_pb2.ChoiceDelta(
        index=0,
        tool_calls=[generation_pb2.ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"city": ')],
    )
    second = generation_pb2.ChoiceDelta(
        index=0,
        tool_calls=[generation_pb2.ToolCallDelta(index=0, arguments='"Paris"}')],
        finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS,
    )
    upstream.chunks = [
        generation_pb2.GenerationChunk(model=MODEL_ID, created=CREATED, choices=[first]),
        generation_pb2.GenerationChunk(model=MODEL_ID, created=CREATED, choices=[second]),
    ]
    client = async_client(translator)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    stream = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    calls = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "call_1" and calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert "".join(call.function.arguments for call in calls) == '{"city": "Paris"}'
    assert calls[1].id is None and calls[1].function.name is None
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    request = upstream.requests_of("Chat")[0]
    assert request.tools[0].function.name == "get_weather"
    assert request.tools[0].function.parameters["properties"]["city"]["type"] == "string"
    assert request.tool_choice.function_name == "get_weather" and request.parallel_tool_calls is False


async def test_non_stream_tool_calls_and_tool_results(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    upstream.result = text_result("")
    upstream.result.choices[0].finish_reason = common_pb2.FINISH_REASON_TOOL_CALLS
    upstream.result.choices[0].tool_calls.append(
        generation_pb2.ToolCall(
            id="call_9", type="function", function=generation_pb2.FunctionCall(name="add", arguments='{"a": 1}')
        )
    )
    client = async_client(translator)
    reply = await client.chat.completions.create(
        model=MODEL_ID,
        tool_choice="required",
        messages=[
            {"role": "user", "content": "add"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 0}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": "0"},
        ],
        tools=[{"type": "function", "function": {"name": "add"}}],
    )
    message = reply.choices[0].message
    assert message.content is None and reply.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].id == "call_9" and json.loads(message.tool_calls[0].function.arguments) == {"a": 1}
    request = upstream.requests_of("ChatUnary")[0]
    assert request.messages[1].tool_calls[0].function.arguments == '{"a": 0}'
    assert request.messages[2].tool_call_id == "call_0" and request.messages[2].content[0].text == "0"
    assert request.tool_choice.mode == generation_pb2.ToolChoice.MODE_REQUIRED


async def test_json_schema_and_extensions_mapping(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    client = async_client(translator)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}},
        extra_body={
            "top_k": 40,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": False},
            "priority": 5,
            "skip_special_tokens": False,
        },
        logit_bias={"42": -100},
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        max_tokens=9,
    )
    request = upstream.requests_of("ChatUnary")[0]
    response_format = request.sampling.response_format
    assert response_format.type == common_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    assert response_format.schema_name == "count" and response_format.strict
    assert response_format.json_schema["required"][0] == "n"
    sampling = request.sampling
    assert sampling.top_k == 40 and sampling.min_tokens == 2 and sampling.ignore_eos and sampling.max_tokens == 9
    assert sampling.logit_bias[42] == -100 and sampling.skip_special_tokens is False
    assert abs(sampling.presence_penalty - 0.5) < 1e-6 and abs(sampling.frequency_penalty + 0.5) < 1e-6
    assert request.chat_template_kwargs["enable_thinking"] is False and request.options.priority == 5
