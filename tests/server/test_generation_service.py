"""GenerationService over a real loopback grpc.aio server, with a scripted engine and a tiny tokenizer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from protoserve.server.engine.api import FinishReason
from protoserve.v1 import common_pb2
from protoserve.v1 import generation_pb2 as pb

try:
    from .generation_fakes import FakeEngine, RunningServer, start_server, stop_server, text_script, tiny_tokenizer
except ImportError:
    from generation_fakes import (  # type: ignore[no-redef]
        FakeEngine,
        RunningServer,
        start_server,
        stop_server,
        text_script,
        tiny_tokenizer,
    )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def running(engine: FakeEngine) -> AsyncIterator[RunningServer]:
    server = await start_server(engine)
    yield server
    await stop_server(server)


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role="user", content=[pb.ContentPart(text=text)])


async def collect(call: object) -> list[pb.GenerationChunk]:
    return [chunk async for chunk in call]  # type: ignore[attr-defined]


async def test_generate_streams_one_chunk_per_engine_output(running: RunningServer, engine: FakeEngine) -> None:
    chunks = await collect(running.stub.Generate(pb.GenerateRequest(text="hello world")))
    assert len(chunks) == 2
    assert len({(chunk.request_id, chunk.model, chunk.created) for chunk in chunks}) == 1
    assert chunks[0].request_id.startswith("req-") and chunks[0].model == "tiny" and chunks[0].created > 0
    assert "".join(chunk.choices[0].text for chunk in chunks) == "Hello world"
    assert chunks[0].choices[0].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    assert chunks[-1].choices[0].finish_reason == common_pb2.FINISH_REASON_STOP
    assert not chunks[0].HasField("usage") and chunks[-1].HasField("usage")
    tokenizer = tiny_tokenizer()
    prompt = tokenizer.encode("hello world")
    usage = chunks[-1].usage
    completion = len(tokenizer.encode("Hello", add_special_tokens=False)) + len(
        tokenizer.encode(" world", add_special_tokens=False)
    )
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        len(prompt),
        completion,
        len(prompt) + completion,
    )
    assert list(engine.requests[0].prompt_token_ids) == prompt


async def test_unary_equals_the_joined_stream(running: RunningServer) -> None:
    request = pb.ChatRequest(messages=[user("hi")], options=common_pb2.RequestOptions(request_id="fixed-id"))
    chunks = await collect(running.stub.Chat(request))
    result = await running.stub.ChatUnary(request)
    assert result.request_id == "fixed-id" and chunks[0].request_id == "fixed-id"
    assert result.choices[0].text == "".join(c.text for chunk in chunks for c in chunk.choices)
    assert list(result.choices[0].token_ids) == [t for chunk in chunks for c in chunk.choices for t in c.token_ids]
    assert result.choices[0].finish_reason == common_pb2.FINISH_REASON_STOP
    assert result.usage == chunks[-1].usage
    generated = await running.stub.GenerateUnary(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7])))
    assert generated.choices[0].text == "Hello world" and generated.usage.prompt_tokens == 3


async def test_chat_prompt_is_the_rendered_template(running: RunningServer, engine: FakeEngine) -> None:
    await running.stub.ChatUnary(pb.ChatRequest(messages=[user("hi")]))
    tokenizer = tiny_tokenizer()
    assert (
        tokenizer.decode(engine.requests[0].prompt_token_ids)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


async def test_n_choices_logprobs_and_sampling_reach_the_engine(engine: FakeEngine) -> None:
    engine.script = text_script([["A", "B"], ["C", "D", "E"]], with_logprobs=True, cached_tokens=2)
    running = await start_server(engine)
    try:
        sampling = common_pb2.SamplingParams(n=2, logprobs=True, top_logprobs=2, seed=7, temperature=0.5, max_tokens=9)
        options = common_pb2.RequestOptions(priority=5)
        result = await running.stub.GenerateUnary(pb.GenerateRequest(text="hi", sampling=sampling, options=options))
    finally:
        await stop_server(running)
    sent = engine.requests[0]
    assert sent.params.n == 2 and sent.params.seed == 7 and sent.params.temperature == 0.5 and sent.priority == 5
    assert sent.params.max_tokens == 9 and sent.params.top_logprobs == 2
    assert [choice.index for choice in result.choices] == [0, 1]
    assert [choice.text for choice in result.choices] == ["AB", "CDE"]
    tokenizer = tiny_tokenizer()
    first = result.choices[0].logprobs[0]
    assert first.token_id == tokenizer.encode("A", add_special_tokens=False)[0] and first.token == "A"
    assert first.token_bytes == b"A" and first.logprob == -0.5 and len(first.top_logprobs) == 2
    assert result.usage.cached_tokens == 2


async def test_default_max_tokens_is_trimmed_to_the_room_left(engine: FakeEngine) -> None:
    from protoserve.server.limits import RequestLimits

    try:
        from .generation_fakes import server_config
    except ImportError:
        from generation_fakes import server_config  # type: ignore[no-redef]
    running = await start_server(engine, config=server_config(RequestLimits(default_max_tokens=1000)))
    try:
        await running.stub.GenerateUnary(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 200)))
        await running.stub.GenerateUnary(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 10)))
    finally:
        await stop_server(running)
    assert [request.params.max_tokens for request in engine.requests] == [56, 246]


async def test_unset_max_tokens_is_left_to_the_engine(running: RunningServer, engine: FakeEngine) -> None:
    await running.stub.GenerateUnary(pb.GenerateRequest(text="hi"))
    assert engine.requests[0].params.max_tokens is None


async def test_prompt_over_the_context_names_both_numbers(running: RunningServer, engine: FakeEngine) -> None:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1] * 200), sampling=common_pb2.SamplingParams(max_tokens=100)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.stub.GenerateUnary(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context length is 256" in raised.value.details() and "200 in the prompt plus 100" in raised.value.details()
    assert not engine.requests


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.GenerateRequest(), "prompt is not set"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids is empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[99999])), "outside the vocabulary"),
        (pb.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(temperature=3)), "sampling.temperature"),
        (pb.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(n=50)), "sampling.n must be at most 8"),
        (pb.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(top_logprobs=2)), "needs sampling.logprobs"),
        (pb.GenerateRequest(text="hi", options=common_pb2.RequestOptions(priority=1000)), "options.priority"),
        (pb.GenerateRequest(text="x" * 4_000_001), "at most 4000000 allowed"),
    ],
)
async def test_bad_generate_requests(
    running: RunningServer, engine: FakeEngine, request_: pb.GenerateRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.stub.GenerateUnary(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert not engine.requests


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ChatRequest(), "messages is empty"),
        (pb.ChatRequest(messages=[pb.ChatMessage(role="user")]), "is empty"),
        (
            pb.ChatRequest(messages=[pb.ChatMessage(role="wizard", content=[pb.ContentPart(text="x")])]),
            "role is 'wizard'",
        ),
        (
            pb.ChatRequest(messages=[user("hi")], tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)),
            "no tools are given",
        ),
        (
            pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(image=pb.Image(data=b"png"))])]
            ),
            "this model takes text only",
        ),
        (pb.ChatRequest(messages=[user("hi")], sampling=common_pb2.SamplingParams(stop=[""])), "stop[0] is empty"),
    ],
)
async def test_bad_chat_requests(
    running: RunningServer, engine: FakeEngine, request_: pb.ChatRequest, message: str
) -> None:
    for call in (running.stub.ChatUnary(request_), collect(running.stub.Chat(request_))):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in raised.value.details()
    assert not engine.requests


async def test_chat_template_kwargs_reserved_name_is_refused(running: RunningServer) -> None:
    request = pb.ChatRequest(messages=[user("hi")])
    request.chat_template_kwargs.update({"chat_template": "{{ 1 }}"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.stub.ChatUnary(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in raised.value.details()


async def test_unknown_model_is_not_found(running: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.stub.GenerateUnary(pb.GenerateRequest(model="nope", text="hi"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_model_without_chat_template_refuses_chat(engine: FakeEngine) -> None:
    running = await start_server(engine, tokenizer=tiny_tokenizer(with_template=False))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await running.stub.ChatUnary(pb.ChatRequest(messages=[user("hi")]))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no chat template" in raised.value.details()
        assert (await running.stub.GenerateUnary(pb.GenerateRequest(text="hi"))).choices[0].text == "Hello world"
    finally:
        await stop_server(running)


async def test_engine_error_finish_ends_with_internal(engine: FakeEngine) -> None:
    engine.script = text_script([["partial"]], finish=FinishReason.ERROR)
    running = await start_server(engine)
    try:
        call = running.stub.Generate(pb.GenerateRequest(text="hi"))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for chunk in call:
                received.append(chunk)
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert received[0].choices[0].finish_reason == common_pb2.FINISH_REASON_ERROR
    finally:
        await stop_server(running)


async def test_client_cancel_aborts_the_engine_request(engine: FakeEngine) -> None:
    engine.script = text_script([["a", "b", "c"]])
    engine.hang_after = 1
    running = await start_server(engine)
    try:
        call = running.stub.Generate(
            pb.GenerateRequest(text="hi", options=common_pb2.RequestOptions(request_id="gone"))
        )
        first = await call.read()
        assert first.choices[0].text == "a"
        await asyncio.wait_for(engine.started.wait(), 5)
        call.cancel()
        for _ in range(100):
            if engine.aborted:
                break
            await asyncio.sleep(0.02)
        assert len(engine.aborted) == 1 and engine.aborted[0].startswith("gone/")
    finally:
        await stop_server(running)


async def test_deadline_gives_deadline_exceeded_and_aborts(engine: FakeEngine) -> None:
    engine.hang_after = 0
    running = await start_server(engine)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await running.stub.ChatUnary(pb.ChatRequest(messages=[user("hi")]), timeout=0.3)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):
            if engine.aborted:
                break
            await asyncio.sleep(0.02)
        assert len(engine.aborted) == 1 and engine.aborted[0] == engine.requests[0].request_id
    finally:
        await stop_server(running)


async def test_tokenize_text_and_messages(running: RunningServer) -> None:
    tokenizer = tiny_tokenizer()
    response = await running.stub.Tokenize(pb.TokenizeRequest(text="hello world"))
    assert list(response.token_ids) == tokenizer.encode("hello world") and response.context_length == 256
    assert "".join(response.tokens) == "hello world"
    chat = await running.stub.Tokenize(pb.TokenizeRequest(messages=pb.ChatMessages(messages=[user("hi")])))
    assert "".join(chat.tokens) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.stub.Tokenize(pb.TokenizeRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input is not set" in raised.value.details()


async def test_metrics_are_reported(engine: FakeEngine) -> None:
    from protoserve.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    running = await start_server(engine, metrics=metrics)
    try:
        await collect(running.stub.Generate(pb.GenerateRequest(text="hi")))
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.ChatUnary(pb.ChatRequest())
    finally:
        await stop_server(running)
    exposition = metrics.render().decode()
    assert 'protoserve_requests_total{code="OK",model="tiny",rpc="Generate"} 1.0' in exposition
    assert 'protoserve_requests_total{code="INVALID_ARGUMENT",model="tiny",rpc="ChatUnary"} 1.0' in exposition
    assert 'protoserve_time_to_first_token_seconds_count{model="tiny"} 1.0' in exposition
    assert 'protoserve_inter_token_latency_seconds_count{model="tiny"} 1.0' in exposition
    assert 'protoserve_completion_tokens_total{model="tiny"}' in exposition
