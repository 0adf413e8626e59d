"""Bad input: generated and hand-made hostile requests to every REST route and gRPC method.

Against a real server and translator (subprocesses; a tiny chat model with a 64-token context so
any accepted request ends fast, and the whisper demo model for uploads). Every answer must be a
4xx (or a 2xx), never a 5xx; error bodies carry no stack trace and no memory address; gRPC calls end
with a client-error status, never INTERNAL or UNKNOWN; afterwards both processes still answer.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protoserve.v1 import generation_pb2, generation_pb2_grpc, transcription_pb2, transcription_pb2_grpc

try:  # the HTTP client the openai SDK brings (renamed httpx2 in recent releases)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases
    import httpx  # type: ignore[no-redef]

from e2e.stack import StackProcess, start_server_process, start_translator_process, stop_process

from reliability import fuzz_inputs
from reliability.recorder import ReliabilityRecorder
from reliability.stack import build_tiny_chat_model

if TYPE_CHECKING:
    from protoserve.server.demo_models import DemoModels

QUICK_EXAMPLES = 60
SLOW_EXAMPLES = int(os.environ.get("PROTOSERVE_FUZZ_EXAMPLES", "1500"))
LEAK_PATTERNS = re.compile(r"Traceback|File \"/|at 0x[0-9a-fA-F]{6,}|<[a-zA-Z_.]+ object at")
CLIENT_ERROR_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@dataclass
class FuzzStack:
    server: StackProcess
    translator: StackProcess
    http: httpx.Client
    channel: grpc.Channel
    tried: Counter[str] = field(default_factory=Counter)

    def check_http(self, route: str, response: httpx.Response) -> None:
        self.tried[route] += 1
        assert response.status_code < 500, f"{route}: {response.status_code} {response.text[:500]}"
        assert not LEAK_PATTERNS.search(response.text[:20000]), f"{route} leaked internals: {response.text[:500]}"
        # A stream that started (200) reports later failures as error events: none may be a server error.
        assert '"server_error"' not in response.text, f"{route}: server error inside a 200: {response.text[-500:]}"
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"]

    def check_rpc(self, method: str, error: grpc.RpcError | None) -> None:
        self.tried[method] += 1
        if error is None:
            return
        assert error.code() in CLIENT_ERROR_CODES, f"{method}: {error.code()} {error.details()}"
        assert not LEAK_PATTERNS.search(error.details() or ""), error.details()


@pytest.fixture(scope="module")
def fuzz_stack(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    folder = tmp_path_factory.mktemp("fuzz-stack")
    model = build_tiny_chat_model(folder / "tiny", context_length=64)
    server = start_server_process(
        [f"tiny={model}", f"speech={demo_models.speech}"], folder / "server.sock", folder / "server.log"
    )
    translator = start_translator_process(server.address, folder / "translator.log", ["--max-body-bytes", "2000000"])
    http = httpx.Client(base_url=translator.address, timeout=60)
    channel = grpc.insecure_channel(server.address)
    try:
        yield FuzzStack(server, translator, http, channel)
    finally:
        channel.close()
        http.close()
        stop_process(translator)
        stop_process(server)


def _post_json_bodies(stack: FuzzStack, route: str, bodies: st.SearchStrategy[object], examples: int) -> None:
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies)
    def post(body: object) -> None:
        response = stack.http.post(
            route, content=fuzz_inputs.encode_body(body), headers={"Content-Type": "application/json"}
        )
        stack.check_http(route, response)

    post()


def _fuzz_rest(stack: FuzzStack, examples: int) -> None:
    _post_json_bodies(stack, "/v1/chat/completions", fuzz_inputs.chat_bodies("tiny"), examples)
    _post_json_bodies(stack, "/v1/completions", fuzz_inputs.completion_bodies("tiny"), examples)
    _post_json_bodies(stack, "/v1/responses", fuzz_inputs.responses_bodies("tiny"), examples)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        data=fuzz_inputs.upload_bytes,
        fields=fuzz_inputs.form_fields,
        route=st.sampled_from(["transcriptions", "translations"]),
    )
    def upload(data: bytes, fields: dict[str, str], route: str) -> None:
        response = stack.http.post(f"/v1/audio/{route}", data=fields, files={"file": ("clip.wav", data)})
        stack.check_http(f"/v1/audio/{route}", response)

    upload()

    @settings(max_examples=examples // 2, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(model_id=fuzz_inputs.unicode_text)
    def retrieve(model_id: str) -> None:
        response = stack.http.get(f"/v1/models/{quote(model_id, safe='')}")
        stack.check_http("/v1/models/{id}", response)

    retrieve()


def _fuzz_grpc(stack: FuzzStack, examples: int) -> None:
    stub = generation_pb2_grpc.GenerationServiceStub(stack.channel)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=fuzz_inputs.generate_requests("tiny"))
    def generate(request: generation_pb2.GenerateRequest) -> None:
        try:
            stub.GenerateUnary(request, timeout=60)
        except grpc.RpcError as error:
            stack.check_rpc("GenerateUnary", error)
        else:
            stack.check_rpc("GenerateUnary", None)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=fuzz_inputs.chat_requests("tiny"))
    def chat(request: generation_pb2.ChatRequest) -> None:
        try:
            for _chunk in stub.Chat(request, timeout=60):
                pass
        except grpc.RpcError as error:
            stack.check_rpc("Chat", error)
        else:
            stack.check_rpc("Chat", None)

    transcription = transcription_pb2_grpc.TranscriptionServiceStub(stack.channel)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=fuzz_inputs.transcribe_requests())
    def transcribe(request: transcription_pb2.TranscribeRequest) -> None:
        try:
            for _chunk in transcription.Transcribe(request, timeout=60):
                pass
        except grpc.RpcError as error:
            stack.check_rpc("Transcribe", error)
        else:
            stack.check_rpc("Transcribe", None)

    @settings(max_examples=examples // 2, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=fuzz_inputs.tokenize_requests("tiny"))
    def tokenize(request: generation_pb2.TokenizeRequest) -> None:
        try:
            stub.Tokenize(request, timeout=60)
        except grpc.RpcError as error:
            stack.check_rpc("Tokenize", error)
        else:
            stack.check_rpc("Tokenize", None)

    generate()
    chat()
    transcribe()
    tokenize()


JSON = "application/json"
CHAT = b'{"model": "tiny", "messages": '
USER_WORD = b'[{"role": "user", "content": "w1"}]'
HAND_MADE_BODIES: list[tuple[str, bytes, str]] = [
    ("malformed UTF-8", CHAT + b'[{"role": "user", "content": "\xff\xfe\xfd"}]}', JSON),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, JSON),
    ("deep nesting in a field", CHAT + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON),
    ("huge integer", CHAT + USER_WORD + b', "max_tokens": 1' + b"0" * 5000 + b"}", JSON),
    ("NaN", CHAT + USER_WORD + b', "temperature": NaN}', JSON),
    ("string body", b'"hello"', JSON),
    ("null body", b"null", JSON),
    ("number body", b"42", JSON),
    ("list body", b"[]", JSON),
    ("empty body", b"", JSON),
    ("not JSON", b"model=tiny", "application/x-www-form-urlencoded"),
    ("truncated JSON", CHAT + b'[{"role": "us', JSON),
    ("lone surrogate escape", CHAT + b'[{"role": "user", "content": "\\ud800"}]}', JSON),
]


def _hand_made(stack: FuzzStack) -> None:
    for name, body, content_type in HAND_MADE_BODIES:
        for route in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            response = stack.http.post(route, content=body, headers={"Content-Type": content_type})
            stack.check_http(route, response)
            assert 400 <= response.status_code < 500, f"{name} to {route}: {response.status_code}"
    boundary = "xyzboundary"
    truncated = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'.encode()
    response = stack.http.post(
        "/v1/audio/transcriptions", content=truncated,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    stack.check_http("/v1/audio/transcriptions", response)
    assert 400 <= response.status_code < 500
    too_long = stack.http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "w1 " * 100}], "max_tokens": 4},
    )
    stack.check_http("/v1/chat/completions", too_long)
    assert too_long.status_code == 400
    numbers = {int(number) for number in re.findall(r"\d+", too_long.json()["error"]["message"])}
    assert 64 in numbers and any(number > 64 for number in numbers), too_long.text


def _still_serving(stack: FuzzStack) -> None:
    assert stack.server.running and stack.translator.running
    response = stack.http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "w1 w2 w3"}], "max_tokens": 4,
              "temperature": 0, "ignore_eos": True},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_hostile_inputs_never_5xx(fuzz_stack: FuzzStack, reliability_recorder: ReliabilityRecorder) -> None:
    _hand_made(fuzz_stack)
    _fuzz_rest(fuzz_stack, QUICK_EXAMPLES)
    _fuzz_grpc(fuzz_stack, QUICK_EXAMPLES)
    _still_serving(fuzz_stack)
    reliability_recorder.record(
        "bad_input.quick",
        "Bad input",
        "generated and hand-made hostile requests to every REST route and gRPC generation method: "
        "no 5xx, no INTERNAL, no stack trace or address in any error; the server answered correctly afterwards",
        inputs_tried=sum(fuzz_stack.tried.values()),
        routes_and_methods=len(fuzz_stack.tried),
        lost=0,
    )


@pytest.mark.slow
def test_hostile_inputs_never_5xx_long(fuzz_stack: FuzzStack, reliability_recorder: ReliabilityRecorder) -> None:
    _fuzz_rest(fuzz_stack, SLOW_EXAMPLES)
    _fuzz_grpc(fuzz_stack, SLOW_EXAMPLES)
    _still_serving(fuzz_stack)
    reliability_recorder.record(
        "bad_input.long",
        "Bad input",
        f"{SLOW_EXAMPLES} generated requests per route and gRPC method: no 5xx, no INTERNAL, no leaked internals",
        inputs_tried=sum(fuzz_stack.tried.values()),
        routes_and_methods=len(fuzz_stack.tried),
        lost=0,
    )
