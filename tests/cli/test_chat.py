"""`protoserve chat` driven by piped stdin, against a fake OpenAI SSE server and a fake gRPC server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc


def run_chat(arguments: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "protoserve.client.cli", "chat", *arguments]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)


def answer_for(messages: list[dict[str, Any]]) -> str:
    """The fakes' answer: which user turn this is, and the last user text."""
    users = [message for message in messages if message["role"] == "user"]
    return f"answer {len(users)} to {users[-1]['content']}"


class FakeOpenAIHandler(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]]
    headers_seen: list[dict[str, str]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, "application/json", json.dumps({"object": "list", "data": [{"id": "fake-chat"}]}).encode())
        else:
            self._send(404, "application/json", b'{"error": {"message": "no such route"}}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        self.headers_seen.append(dict(self.headers))
        last = body["messages"][-1]["content"]
        if last == "refuse":
            error = {"error": {"message": "prompt is too long: 9000 > 2048", "type": "invalid_request_error"}}
            self._send(400, "application/json", json.dumps(error).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if last in ("drip", "stall"):  # a piece every 0.3 s for 3 s, or one piece and 3 s of silence
            pieces = 10 if last == "drip" else 1
            for _ in range(pieces):
                chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "w "}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.3 if last == "drip" else 3)
            self.wfile.write(b"data: [DONE]\n\n")
            return
        answer = answer_for(body["messages"])
        for piece in (answer[:7], answer[7:]):
            chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        if last == "break midway":
            self.wfile.write(b'data: {"error": {"message": "engine failed", "type": "server_error"}}\n\n')
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def openai_server() -> Iterator[tuple[str, type[FakeOpenAIHandler]]]:
    handler = type("Handler", (FakeOpenAIHandler,), {"bodies": [], "headers_seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_http_conversation_is_kept_cleared_and_ended(openai_server: tuple[str, type[FakeOpenAIHandler]]) -> None:
    url, handler = openai_server
    stdin = "hello\nand again\n/clear\nfresh start\n/exit\nnever sent\n"
    result = run_chat(["--url", url, "--system", "be brief", "--temperature", "0", "--api-key", "k"], stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["answer 1 to hello", "answer 2 to and again", "answer 1 to fresh start"]
    assert "(conversation cleared)" in result.stderr
    first, second, third = handler.bodies
    assert first["model"] == "fake-chat" and first["stream"] is True and first["temperature"] == 0
    assert "top_p" not in first
    assert second["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "answer 1 to hello"},
        {"role": "user", "content": "and again"},
    ]
    assert third["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fresh start"}]
    assert {headers["Authorization"] for headers in handler.headers_seen} == {"Bearer k"}


def test_http_errors_drop_the_turn_and_set_the_exit_status(
    openai_server: tuple[str, type[FakeOpenAIHandler]],
) -> None:
    url, handler = openai_server
    result = run_chat(["--url", f"{url}/v1", "--model", "m"], "refuse\nbreak midway\n/nonsense\nok\n")
    assert result.returncode == 1
    assert "HTTP 400: prompt is too long: 9000 > 2048" in result.stderr
    assert "error: engine failed" in result.stderr
    assert "unknown command /nonsense" in result.stderr
    assert handler.bodies[-1]["messages"] == [{"role": "user", "content": "ok"}]  # failed turns were dropped
    assert result.stdout.splitlines()[-1] == "answer 1 to ok"


@pytest.mark.parametrize("last", ["drip", "stall"])
def test_http_timeout_bounds_the_whole_reply(openai_server: tuple[str, type[FakeOpenAIHandler]], last: str) -> None:
    """As over gRPC (a deadline), --timeout gives up on a reply still coming after that long, not
    only on a read that waits that long."""
    url, _ = openai_server
    result = run_chat(["--url", url, "--model", "m", "--timeout", "1"], f"{last}\n")
    assert result.returncode == 1  # the server would have finished the reply after 3 s
    assert "within 1 s (--timeout)" in result.stderr


def test_unreachable_and_bad_urls() -> None:
    refused = run_chat(["--url", "http://127.0.0.1:9"], "hi\n")
    assert refused.returncode == 1 and "cannot reach http://127.0.0.1:9" in refused.stderr
    bad = run_chat(["--url", "ftp://example"], "hi\n")
    assert bad.returncode == 2 and "--url must be http(s)" in bad.stderr
    both = run_chat(["--url", "http://x", "--grpc", "y:1"], "")
    assert both.returncode == 2 and "not allowed with" in both.stderr


class FakeChat(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.requests: list[generation_pb2.ChatRequest] = []

    def Chat(self, request: generation_pb2.ChatRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.requests.append(request)
        messages = [{"role": message.role, "content": message.content[0].text} for message in request.messages]
        if messages[-1]["content"] == "refuse":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no thanks")
        for piece in answer_for(messages).partition(" to "):
            yield generation_pb2.GenerationChunk(choices=[generation_pb2.ChoiceDelta(text=piece)])
        yield generation_pb2.GenerationChunk(usage=common_pb2.Usage(total_tokens=3))


@pytest.fixture
def grpc_chat_server() -> Iterator[tuple[str, FakeChat]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = FakeChat()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_grpc_conversation(grpc_chat_server: tuple[str, FakeChat]) -> None:
    target, servicer = grpc_chat_server
    result = run_chat(["--grpc", target, "--max-tokens", "9", "--seed", "4"], "hi\nrefuse\nmore\n/clear\nnew\n")
    assert result.returncode == 1  # the refused turn
    assert result.stdout.splitlines() == ["answer 1 to hi", "answer 2 to more", "answer 1 to new"]
    assert "INVALID_ARGUMENT: no thanks" in result.stderr
    assert [message.role for message in servicer.requests[2].messages] == ["user", "assistant", "user"]
    assert servicer.requests[2].messages[1].content[0].text == "answer 1 to hi"
    assert servicer.requests[0].sampling.max_tokens == 9 and servicer.requests[0].sampling.seed == 4
    assert not servicer.requests[0].sampling.HasField("temperature")
