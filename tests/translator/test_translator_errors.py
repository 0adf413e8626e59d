"""Upstream failures as HTTP errors (SDK exception types), mid-stream errors, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import openai
import pytest
from fake_upstream import MODEL_ID, FakeUpstream, ScriptedError, running_translator, text_chunks
from protoserve.translator.server import RunningTranslator
from protoserve.v1 import common_pb2

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("code", "exception", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, openai.BadRequestError, 400),
        (grpc.StatusCode.UNAUTHENTICATED, openai.AuthenticationError, 401),
        (grpc.StatusCode.PERMISSION_DENIED, openai.PermissionDeniedError, 403),
        (grpc.StatusCode.NOT_FOUND, openai.NotFoundError, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, openai.RateLimitError, 429),
        (grpc.StatusCode.INTERNAL, openai.InternalServerError, 500),
        (grpc.StatusCode.UNKNOWN, openai.InternalServerError, 500),
        (grpc.StatusCode.UNAVAILABLE, openai.APIStatusError, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, openai.APIStatusError, 504),
        (grpc.StatusCode.CANCELLED, openai.APIStatusError, 499),
    ],
)
async def test_status_mapping_through_sdk(
    translator: RunningTranslator,
    upstream: FakeUpstream,
    code: grpc.StatusCode,
    exception: type[Exception],
    status: int,
) -> None:
    upstream.error = ScriptedError(code, "the upstream says no at 0x7f00dead")
    client = openai.AsyncOpenAI(base_url=f"{translator.url}/v1", api_key="unused", max_retries=0)
    for stream in (False, True):
        with pytest.raises(exception) as caught:
            await client.chat.completions.create(model=MODEL_ID, messages=CHAT["messages"], stream=stream)
        error = caught.value
        assert isinstance(error, openai.APIStatusError) and error.status_code == status
        body = error.body
        assert set(body) == {"message", "type", "param", "code"}
        assert body["code"] == code.name.lower()
        # Messages about the request pass through; server-side failures never echo upstream internals.
        assert ("0x7f00dead" in body["message"]) == (status < 500 and status != 499)


async def test_rate_limit_carries_retry_after(translator: RunningTranslator, upstream: FakeUpstream, http) -> None:
    upstream.error = ScriptedError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", trailing_metadata=(("retry-after", "7"),)
    )
    async with http.post(f"{translator.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 429 and response.headers["Retry-After"] == "7"
        assert (await response.json())["error"]["type"] == "rate_limit_error"
    upstream.error = ScriptedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    async with http.post(f"{translator.url}/v1/chat/completions", json=CHAT) as response:
        assert response.headers["Retry-After"] == "1"
    async with http.get(f"{translator.url}/metrics") as response:
        assert 'protoserve_translator_upstream_errors_total{code="RESOURCE_EXHAUSTED"} 2.0' in await response.text()


async def test_mid_stream_error_is_an_error_event_then_done(
    translator: RunningTranslator, upstream: FakeUpstream, http
) -> None:
    upstream.chunks = text_chunks(["a", "b", "c"])
    upstream.error = ScriptedError(grpc.StatusCode.INTERNAL, "engine blew up", after_messages=1)
    async with http.post(f"{translator.url}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status == 200
        events = [event.removeprefix("data: ") for event in (await response.text()).split("\n\n") if event]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "engine blew up" not in error["message"]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    client = openai.AsyncOpenAI(base_url=f"{translator.url}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(model=MODEL_ID, messages=CHAT["messages"], stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_choice_that_failed_upstream_is_an_error(
    translator: RunningTranslator, upstream: FakeUpstream, http
) -> None:
    upstream.chunks = text_chunks(["a", "b"], finish=common_pb2.FINISH_REASON_ERROR)
    async with http.post(f"{translator.url}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        events = [event for event in (await response.text()).split("\n\n") if event]
    assert events[-1] == "data: [DONE]" and "error" in json.loads(events[-2].removeprefix("data: "))
    upstream.result.choices[0].finish_reason = common_pb2.FINISH_REASON_ERROR
    async with http.post(f"{translator.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 500


async def test_abort_finish_reason_is_stop(translator: RunningTranslator, upstream: FakeUpstream, http) -> None:
    upstream.result.choices[0].finish_reason = common_pb2.FINISH_REASON_ABORT
    async with http.post(f"{translator.url}/v1/chat/completions", json=CHAT) as response:
        assert (await response.json())["choices"][0]["finish_reason"] == "stop"


async def test_disconnect_during_stream_cancels_upstream(
    translator: RunningTranslator, upstream: FakeUpstream, http
) -> None:
    upstream.chunks = text_chunks([str(number) for number in range(50)])
    upstream.delay_seconds = 0.1
    response = await http.post(f"{translator.url}/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status == 200
    await response.content.readline()  # the first event arrived: the upstream call is running
    response.close()  # drop the connection mid-stream
    await asyncio.wait_for(upstream.cancelled.wait(), timeout=5)


async def test_disconnect_while_waiting_for_unary_cancels_upstream(
    translator: RunningTranslator, upstream: FakeUpstream
) -> None:
    upstream.delay_seconds = 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(f"{translator.url}/v1/chat/completions", json=CHAT)
    await asyncio.wait_for(upstream.cancelled.wait(), timeout=5)


async def test_request_timeout_header_becomes_a_deadline(
    translator: RunningTranslator, upstream: FakeUpstream, http
) -> None:
    upstream.delay_seconds = 5
    headers = {"X-Request-Timeout": "0.2"}
    async with http.post(f"{translator.url}/v1/chat/completions", json=CHAT, headers=headers) as response:
        assert response.status == 504 and (await response.json())["error"]["type"] == "timeout_error"
    for bad in ("soon", "-1", "nan", "1e9"):
        async with http.post(
            f"{translator.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Timeout": bad}
        ) as response:
            assert response.status == 400 and (await response.json())["error"]["param"] == "X-Request-Timeout"


async def test_request_id_is_echoed_and_checked(translator: RunningTranslator, upstream: FakeUpstream, http) -> None:
    async with http.post(
        f"{translator.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-1"}
    ) as response:
        assert response.headers["X-Request-Id"] == "abc-1"
    assert upstream.requests_of("ChatUnary")[0].options.request_id == "abc-1"
    async with http.post(f"{translator.url}/v1/chat/completions", json=CHAT) as response:
        assert len(response.headers["X-Request-Id"]) == 32
    async with http.post(
        f"{translator.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Id": "abc-2"}
    ) as response:
        assert response.headers["X-Request-Id"] == "abc-2"
        await response.read()
    async with http.post(
        f"{translator.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "x" * 500}
    ) as response:
        assert response.status == 400


async def test_upstream_down_gives_503(upstream: FakeUpstream, http) -> None:
    target = upstream.target
    await upstream.stop()
    upstream.target = target
    async with running_translator(upstream) as translator:
        async with http.post(f"{translator.url}/v1/chat/completions", json=CHAT) as response:
            body = await response.json()
            assert response.status == 503 and "127.0.0.1" not in body["error"]["message"]
        async with http.get(f"{translator.url}/health") as response:
            assert response.status == 503


async def test_health_follows_upstream(translator: RunningTranslator, upstream: FakeUpstream, http) -> None:
    from grpc_health.v1 import health_pb2

    async with http.get(f"{translator.url}/health") as response:
        assert response.status == 200 and (await response.json())["status"] == "ok"
    await upstream.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    async with http.get(f"{translator.url}/health") as response:
        assert response.status == 503
