"""Security: API keys on every REST route and gRPC method (path tricks included), keys kept out of
logs, chat template kwargs that stay data, and error bodies without internals."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve.translator.config import TranslatorConfig
from protoserve.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    transcription_pb2,
    transcription_pb2_grpc,
)

from reliability.clients import chat_body, unlimited_session
from reliability.recorder import ReliabilityRecorder
from reliability.stack import InProcessStack, in_process_stack

CLIENT_KEY = "client-key-5b1e0c7d9a"
SERVER_KEY = "server-key-77f3e2a8c4"

# Raw request targets a client can send; none of them may reach a handler without a key.
PROTECTED_TARGETS = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/tiny"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("GET", "//v1/models"),
    ("GET", "/v1//models"),
    ("GET", "/v1/../v1/models"),
    ("GET", "/./v1/models"),
    ("GET", "/health/../v1/models"),
    ("GET", "/V1/models"),
    ("GET", "/v1/MODELS"),
    ("GET", "/v1/models/"),
    ("GET", "/v1/models?x=/health"),
    ("GET", "/%761/models"),
    ("GET", "/v1%2fmodels"),
    ("GET", "/health/%2e%2e/v1/models"),
    ("GET", "http://127.0.0.1/v1/models"),
    ("POST", "//v1/chat/completions"),
    ("POST", "/v1/chat/completions/"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
]
HOST_HEADERS = ["127.0.0.1", "localhost", "evil.example", "127.0.0.1:1", ""]


async def raw_http(port: int, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, str]:
    """Send one HTTP/1.1 request exactly as written (no client-side path normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {target} HTTP/1.1", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, payload.decode("utf-8", errors="replace")


@pytest.fixture
async def keyed_stack(tiny_model_folder: Path) -> AsyncIterator[InProcessStack]:
    translator = TranslatorConfig(api_keys=(CLIENT_KEY,), upstream_api_key=SERVER_KEY)
    async with in_process_stack(tiny_model_folder, translator=translator, api_keys=(SERVER_KEY,)) as stack:
        yield stack


async def test_api_keys_guard_every_route_and_method(
    keyed_stack: InProcessStack, reliability_recorder: ReliabilityRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = keyed_stack.translator.port
    tried = 0
    for method, target in PROTECTED_TARGETS:
        for host in HOST_HEADERS:
            for authorization in (None, "Bearer wrong", f"Basic {CLIENT_KEY}", f"Bearer {CLIENT_KEY[:-1]}", "Bearer"):
                headers = {"Host": host} if host else {}
                if authorization is not None:
                    headers["Authorization"] = authorization
                status, body = await raw_http(port, method, target, headers, b"{}" if method == "POST" else b"")
                tried += 1
                assert status in (400, 401, 404), f"{method} {target} Host={host!r} auth={authorization!r}: {status}"
                assert status != 200 and CLIENT_KEY not in body
    health_status, _ = await raw_http(port, "GET", "/health", {"Host": "127.0.0.1"})
    assert health_status == 200, "health stays open"

    async with unlimited_session() as session:
        ok = await session.post(
            f"{keyed_stack.base_url}/chat/completions",
            json=chat_body("tiny", "w1 w2", 4, stream=False),
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
        assert ok.status == 200, await ok.text()

    grpc_checked = await _grpc_methods_need_the_key(keyed_stack)
    logged = caplog.text
    assert CLIENT_KEY not in logged and SERVER_KEY not in logged and CLIENT_KEY[:-1] not in logged

    reliability_recorder.record(
        "security.api_keys",
        "Security",
        "with keys set, every /v1 route (path tricks, case, slashes, encodings, absolute-form targets, "
        "Host games) and every gRPC method refused a missing or wrong key; health stayed open; keys never logged",
        inputs_tried=tried + grpc_checked,
        bypasses=0,
    )


async def _grpc_methods_need_the_key(stack: InProcessStack) -> int:
    calls = {
        "Generate": lambda channel, md: generation_pb2_grpc.GenerationServiceStub(channel).GenerateUnary(
            generation_pb2.GenerateRequest(text="w1", model="tiny"), metadata=md, timeout=10
        ),
        "Chat": lambda channel, md: generation_pb2_grpc.GenerationServiceStub(channel).ChatUnary(
            generation_pb2.ChatRequest(model="tiny"), metadata=md, timeout=10
        ),
        "Tokenize": lambda channel, md: generation_pb2_grpc.GenerationServiceStub(channel).Tokenize(
            generation_pb2.TokenizeRequest(text="w1"), metadata=md, timeout=10
        ),
        "ListModels": lambda channel, md: models_pb2_grpc.ModelServiceStub(channel).ListModels(
            models_pb2.ListModelsRequest(), metadata=md, timeout=10
        ),
        "GetModel": lambda channel, md: models_pb2_grpc.ModelServiceStub(channel).GetModel(
            models_pb2.GetModelRequest(id="tiny"), metadata=md, timeout=10
        ),
        "LoadModel": lambda channel, md: models_pb2_grpc.ModelServiceStub(channel).LoadModel(
            models_pb2.LoadModelRequest(id="tiny"), metadata=md, timeout=10
        ),
        "UnloadModel": lambda channel, md: models_pb2_grpc.ModelServiceStub(channel).UnloadModel(
            models_pb2.UnloadModelRequest(id="tiny"), metadata=md, timeout=10
        ),
    }
    checked = 0
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        for name, call in calls.items():
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", CLIENT_KEY),)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(channel, metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
                checked += 1
        transcribe = transcription_pb2_grpc.TranscriptionServiceStub(channel).Transcribe(
            transcription_pb2.TranscribeRequest(audio=b"x"), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _chunk in transcribe:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = await models_pb2_grpc.ModelServiceStub(channel).ListModels(
            models_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {SERVER_KEY}"),), timeout=10
        )
        assert [model.id for model in listed.models] == ["tiny"]
    return checked + 1


async def test_template_kwargs_stay_data(tiny_model_folder: Path, reliability_recorder: ReliabilityRecorder) -> None:
    """The tiny template prints the variable `extra`: Jinja in it must come out as text, never run."""
    attacks = [
        "{{ 7*7 }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for x in range(10**9) %}x{% endfor %}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ]
    async with in_process_stack(tiny_model_folder) as stack, unlimited_session() as session:
        for attack in attacks:
            body = chat_body("tiny", "w1", 1, stream=False, chat_template_kwargs={"extra": attack})
            async with session.post(f"{stack.base_url}/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
                usage = (await response.json())["usage"]
            # "w1" plus the attack's whitespace-separated words, each one token: printed, not evaluated.
            assert usage["prompt_tokens"] == 1 + len(attack.split()), attack
        refused = [
            {"chat_template": "{{ 7*7 }}"},
            {"messages": []},
            {"tokenize": False},
            {"extra": "w1 " * 20_000},
        ]
        for kwargs in refused:
            body = chat_body("tiny", "w1", 1, stream=False, chat_template_kwargs=kwargs)
            async with session.post(f"{stack.base_url}/chat/completions", json=body) as response:
                text = await response.text()
                assert response.status == 400, (kwargs, text)
                assert "Traceback" not in text and json.loads(text)["error"]["message"]
    reliability_recorder.record(
        "security.template_kwargs",
        "Security",
        "Jinja sent in chat_template_kwargs was rendered as text, never evaluated; reserved renderer options "
        "and oversize kwargs were refused with 400",
        inputs_tried=len(attacks) + len(refused),
        bypasses=0,
    )
