"""OpenAIModelBackend against a small aiohttp server that plays raw SSE: tool-call deltas, default
model discovery, the key header, and every way a stream can go wrong."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from protoserve.client.agent.model_backends import ModelCallFailed
from protoserve.client.agent.openai_backend import OpenAIModelBackend, api_base_url, event_lines

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402


def sse(*events: Any, done: bool = True) -> str:
    lines = [f"data: {json.dumps(event)}\n\n" for event in events]
    return ": keep-alive comment\n\n" + "".join(lines) + ("data: [DONE]\n\n" if done else "")


def delta_event(delta: dict[str, Any], finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}


class FakeOpenAI:
    """Answers /v1/models and /v1/chat/completions with whatever the test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.body = ""
        self.requests: list[dict[str, Any]] = []
        self.headers: list[str] = []

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "served-model"}, {"id": "other"}]})

    async def chat(self, request: web.Request) -> web.Response:
        self.requests.append(await request.json())
        self.headers.append(request.headers.get("Authorization", ""))
        content_type = "text/event-stream" if self.status == 200 else "application/json"
        return web.Response(status=self.status, text=self.body, content_type=content_type)


@pytest.fixture
async def fake_openai() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    app = web.Application()
    app.router.add_get("/prefix/v1/models", fake.models)
    app.router.add_post("/prefix/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}/prefix"
    await runner.cleanup()


async def test_streamed_text_and_tool_calls(fake_openai: tuple[FakeOpenAI, str]) -> None:
    fake, url = fake_openai
    fake.body = sse(
        delta_event({"role": "assistant", "content": "Adding"}),
        delta_event({"content": " now."}),
        delta_event({"content": "ignored: another choice"}, index=1),
        delta_event({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "add"}}]}),
        delta_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 2, '}}]}),
        delta_event({"tool_calls": [{"index": 0, "function": {"arguments": '"b": 3}'}}]}),
        delta_event({}, finish_reason="tool_calls"),
    )
    backend = OpenAIModelBackend(url, api_key="secret", sampling={"temperature": 0.0})
    pieces: list[str] = []
    try:
        turn = await backend.reply(
            [{"role": "user", "content": "2+3"}],
            tools=[{"type": "function"}],
            tool_choice="required",
            on_text=pieces.append,
        )
    finally:
        await backend.close()
    assert pieces == ["Adding", " now."] and turn.text == "Adding now."
    assert [(call.id, call.name, json.loads(call.arguments)) for call in turn.tool_calls] == [
        ("c1", "add", {"a": 2, "b": 3})
    ]
    assert turn.finish_reason == "tool_calls"
    sent = fake.requests[0]
    assert sent["model"] == "served-model"  # the first of GET /v1/models
    assert (sent["stream"], sent["tool_choice"], sent["temperature"]) == (True, "required", 0.0)
    assert fake.headers == ["Bearer secret"]


async def test_no_tools_means_no_tool_fields(fake_openai: tuple[FakeOpenAI, str]) -> None:
    fake, url = fake_openai
    fake.body = sse(delta_event({"content": "hi"}, finish_reason="stop"))
    backend = OpenAIModelBackend(url, model="chosen")
    try:
        turn = await backend.reply([{"role": "user", "content": "hi"}], tools=[], tool_choice="auto", on_text=print)
    finally:
        await backend.close()
    assert turn.text == "hi" and "tools" not in fake.requests[0] and "tool_choice" not in fake.requests[0]
    assert fake.requests[0]["model"] == "chosen" and fake.headers == [""]


async def test_a_tool_call_longer_than_aiohttps_line_limit(fake_openai: tuple[FakeOpenAI, str]) -> None:
    """The server sends a call's arguments whole in one event: a big file to write is one long line
    (aiohttp's readline stops at 512 KiB)."""
    fake, url = fake_openai
    content = "x" * 700_000
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "write_file"}}
    call["function"]["arguments"] = json.dumps({"path": "big.txt", "content": content})
    fake.body = sse(delta_event({"tool_calls": [call]}), delta_event({}, finish_reason="tool_calls"))
    backend = OpenAIModelBackend(url, model="m")
    try:
        turn = await backend.reply([{"role": "user", "content": "x"}], tools=[{}], tool_choice="auto", on_text=print)
    finally:
        await backend.close()
    assert json.loads(turn.tool_calls[0].arguments)["content"] == content


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
async def test_event_lines_from_chunks_cut_anywhere(size: int) -> None:
    data = b"data: one\n\n: comment\ndata: two\r\n\nlast without newline"
    lines = [line async for line in event_lines(chunks_of(data, size))]
    assert lines == [b"data: one", b"", b": comment", b"data: two\r", b"", b"last without newline"]
    with pytest.raises(ModelCallFailed, match="longer than 8 bytes"):
        [line async for line in event_lines(chunks_of(b"short\n" + b"y" * 20, size), max_line_bytes=8)]


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (400, json.dumps({"error": {"message": "tools were given, but ..."}}), "HTTP 400: tools were given, but ..."),
        (503, "upstream down", "HTTP 503: upstream down"),
        (200, sse({"error": {"message": "the engine failed"}}), "the engine failed"),
        (200, sse(delta_event({"content": "cut"}), done=False), "ended without [DONE]"),
        (200, "data: {not json}\n\n", "not JSON"),
        (200, "data: [1, 2]\n\n", "unexpected event"),
        (200, sse(delta_event({"tool_calls": [{"index": "zero", "function": {}}]})), "malformed tool-call delta"),
    ],
)
async def test_failures_raise_model_call_failed(
    fake_openai: tuple[FakeOpenAI, str], status: int, body: str, message: str
) -> None:
    fake, url = fake_openai
    fake.status, fake.body = status, body
    backend = OpenAIModelBackend(url, model="m")
    try:
        with pytest.raises(ModelCallFailed) as raised:
            await backend.reply([{"role": "user", "content": "x"}], tools=[], tool_choice="auto", on_text=print)
    finally:
        await backend.close()
    assert message in str(raised.value)


async def test_unreachable_server() -> None:
    backend = OpenAIModelBackend("http://127.0.0.1:9", timeout=5)
    try:
        with pytest.raises(ModelCallFailed, match="cannot reach http://127.0.0.1:9/v1"):
            await backend.reply([{"role": "user", "content": "x"}], tools=[], tool_choice="auto", on_text=print)
    finally:
        await backend.close()


def test_base_urls() -> None:
    assert api_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert api_base_url(" https://host/api ") == "https://host/api/v1"
    for bad in ("ftp://host", "127.0.0.1:8000", "http://", "http://host:port"):
        with pytest.raises(ModelCallFailed):
            api_base_url(bad)
