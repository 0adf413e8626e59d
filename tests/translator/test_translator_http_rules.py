"""HTTP-level rules: body limits, content types, non-object bodies, unknown routes, API keys, CORS."""

from __future__ import annotations

import asyncio
import gzip

import aiohttp
import openai
import pytest
from fake_upstream import MODEL_ID, FakeUpstream, running_translator
from protoserve.translator.server import RunningTranslator

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]}


async def raw_exchange(translator: RunningTranslator, head: str, body_pieces: list[bytes]) -> bytes:
    """Send a request head and body pieces over a raw socket; return what the server answered."""
    reader, writer = await asyncio.open_connection(translator.host, translator.port)
    try:
        writer.write(head.encode())
        for piece in body_pieces:
            writer.write(piece)
            await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout=5)
    finally:
        writer.close()


async def test_declared_length_over_limit_is_413_before_reading(upstream: FakeUpstream) -> None:
    async with running_translator(upstream, max_body_bytes=1024) as translator:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000000\r\n\r\n"
        )
        answer = await raw_exchange(translator, head, [b'{"messages": '])  # nearly all of the body never comes
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
    assert upstream.requests == []


async def test_chunked_body_over_limit_is_413_while_reading(upstream: FakeUpstream) -> None:
    async with running_translator(upstream, max_body_bytes=1024) as translator:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"800\r\n" + b" " * 0x800 + b"\r\n"  # 2048 bytes: over the limit, and no terminating chunk
        answer = await raw_exchange(translator, head, [chunk])
    assert answer.startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    "body",
    [
        b'"a string"',
        b"[1, 2]",
        b"42",
        b"null",
        b"{not json",
        b"\xff\xfe{}",
        b"",
        b'{"messages": NaN}',
        b"[" * 100_000 + b"]" * 100_000,
        b"true",
    ],
)
async def test_non_object_bodies_are_400(translator: RunningTranslator, http, body: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        async with http.post(
            f"{translator.url}{path}", data=body, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400, (path, body[:20])
            error = (await response.json())["error"]
            assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("number", ["1e999", "-1e400"])
async def test_numbers_beyond_a_float_are_400(translator: RunningTranslator, http, number: str) -> None:
    """Python would read them as infinity, which no JSON answer (the Responses API echoes metadata) can carry."""
    bodies = {
        "/v1/chat/completions": '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "x": %s}',
        "/v1/responses": '{"model": "%s", "input": "Hi", "metadata": {"a": %s}}',
    }
    for path, body in bodies.items():
        data = (body % (MODEL_ID, number)).encode()
        async with http.post(
            f"{translator.url}{path}", data=data, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400, path
            assert "out of range" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_body_that_does_not_decompress_is_400(translator: RunningTranslator, encoding: str) -> None:
    kinds = {
        "/v1/chat/completions": "application/json",
        "/v1/responses": "application/json",
        "/v1/audio/transcriptions": "multipart/form-data; boundary=B",
    }
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for path, content_type in kinds.items():
            headers = {"Content-Type": content_type, "Content-Encoding": encoding}
            async with http.post(f"{translator.url}{path}", data=b"not compressed", headers=headers) as response:
                assert response.status == 400, path
                assert response.headers["Connection"] == "close"  # the rest of the body cannot be skipped
                error = (await response.json())["error"]
            assert error["type"] == "invalid_request_error" and encoding in error["message"]
        compressed = gzip.compress(
            b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}]}' % MODEL_ID.encode()
        )
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with http.post(f"{translator.url}/v1/chat/completions", data=compressed, headers=headers) as response:
            assert response.status == 200
            assert (await response.json())["choices"][0]["message"]["content"] == "Hello"


async def test_wrong_types_name_the_field(translator: RunningTranslator, http) -> None:
    cases = [
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "max_tokens": -1}, "max_tokens"),
        ({**CHAT, "max_tokens": 2.5}, "max_tokens"),
        ({**CHAT, "n": True}, "n"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stop": [1]}, "stop[0]"),
        ({**CHAT, "seed": 2**70}, "seed"),
        ({**CHAT, "temperature": 10**400}, "temperature"),
        ({**CHAT, "logit_bias": {"x": 1}}, "logit_bias"),
        ({**CHAT, "logit_bias": {"1_0": 1}}, "logit_bias"),  # int() would read 10
        ({**CHAT, "logit_bias": {" 7 ": 1}}, "logit_bias"),
        ({**CHAT, "logit_bias": {"\u0663": 1}}, "logit_bias"),  # ARABIC-INDIC DIGIT THREE
        ({**CHAT, "tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({**CHAT, "tool_choice": "maybe"}, "tool_choice"),
        ({**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
        ({**CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({**CHAT, "chat_template_kwargs": [1]}, "chat_template_kwargs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ]
    for body, param in cases:
        async with http.post(f"{translator.url}/v1/chat/completions", json=body) as response:
            assert response.status == 400, body
            assert (await response.json())["error"]["param"] == param, body


async def test_unknown_fields_are_ignored(translator: RunningTranslator, http) -> None:
    async with http.post(
        f"{translator.url}/v1/chat/completions",
        json={**CHAT, "metadata": {"a": 1}, "store": True, "x_future_option": [1]},
    ) as response:
        assert response.status == 200


async def test_wrong_content_type_is_415(translator: RunningTranslator, http) -> None:
    async with http.post(
        f"{translator.url}/v1/chat/completions",
        data=b"messages=hi",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as response:
        assert response.status == 415 and (await response.json())["error"]["code"] == "unsupported_media_type"
    async with http.post(f"{translator.url}/v1/audio/transcriptions", json={"file": "x"}) as response:
        assert response.status == 415


async def test_unknown_route_and_wrong_method_are_json(translator: RunningTranslator, http) -> None:
    async with http.get(f"{translator.url}/v1/nothing") as response:
        assert response.status == 404 and (await response.json())["error"]["type"] == "not_found_error"
    async with http.get(f"{translator.url}/v1/chat/completions") as response:
        assert response.status == 405 and "POST" in response.headers["Allow"]
        assert (await response.json())["error"]["code"] == "method_not_allowed"


KEY = "sk-test-key"
TRICKS = [
    "/v1/models",
    "//v1/models",
    "/v1/../v1/models",
    "/V1/models",
    "/v1/models/",
    "/v1/%6Dodels",
    "/v1/models?x=/health",
    "/health/../v1/models",
    "/health/",
    "/%68ealth",
    "/HEALTH",
    "/metrics",
    "/openapi.json",
    "/v1/models/org%2Ftiny-chat",
    "/nothing",
]


async def test_api_key_required_on_every_path_but_health(upstream: FakeUpstream) -> None:
    async with running_translator(upstream, api_keys=("other-key", KEY)) as translator:
        for path in TRICKS:
            head = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            answer = await raw_exchange(translator, head, [])
            assert answer.startswith(b"HTTP/1.1 401"), (path, answer[:40])
            assert b"invalid_api_key" in answer
            wrong = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}x\r\nConnection: close\r\n\r\n"
            assert (await raw_exchange(translator, wrong, [])).startswith(b"HTTP/1.1 401")
        answer = await raw_exchange(translator, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [])
        assert answer.startswith(b"HTTP/1.1 200")
        client = openai.AsyncOpenAI(base_url=f"{translator.url}/v1", api_key=KEY, max_retries=0)
        assert [model.id async for model in client.models.list()] == [MODEL_ID]
        refused = openai.AsyncOpenAI(base_url=f"{translator.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await refused.chat.completions.create(model=MODEL_ID, messages=CHAT["messages"])
    assert upstream.requests_of("ChatUnary") == []


async def test_cors_off_by_default(translator: RunningTranslator, http) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with http.options(f"{translator.url}/v1/chat/completions", headers=preflight) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    async with http.get(f"{translator.url}/v1/models", headers={"Origin": "https://app.example"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_answers_listed_origins_only(upstream: FakeUpstream, http) -> None:
    async with running_translator(upstream, cors_origins=("https://app.example",), api_keys=(KEY,)) as translator:
        url = f"{translator.url}/v1/chat/completions"
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with http.options(url, headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
        async with http.options(url, headers={**preflight, "Origin": "https://evil.example"}) as response:
            assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers
        headers = {"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"}
        async with http.post(url, json={**CHAT, "stream": True}, headers=headers) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            await response.read()
        async with http.post(
            url, json=CHAT, headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"}
        ) as response:
            assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
