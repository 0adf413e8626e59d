"""Faults of the server process: killed mid-stream, and SIGTERM drain. The server runs as a real
subprocess (`protoserve serve`) on a unix socket; the translator runs in the test's event loop."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from e2e.stack import StackProcess, restart_server_process, start_server_process, stop_process
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.server import start_translator
from protoserve.v1 import generation_pb2_grpc

from reliability.clients import chat_body, generate_tokens, greedy_generate_request, streamed_chat, unlimited_session
from reliability.recorder import ReliabilityRecorder
from reliability.stack import tiny_prompt

DRAIN_GRACE_S = 30.0


async def _wait_for_not_serving(channel: grpc.aio.Channel, timeout_s: float = 15.0) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"health still SERVING {timeout_s} s after SIGTERM")


@pytest.fixture
def tiny_server(tiny_model_folder: Path, tmp_path: Path) -> Iterator[StackProcess]:
    server = start_server_process(
        [f"tiny={tiny_model_folder}"],
        tmp_path / "server.sock",
        tmp_path / "server.log",
        extra=["--drain-grace", str(DRAIN_GRACE_S)],
    )
    yield server
    stop_process(server, timeout_s=5)


async def test_server_killed_mid_stream_then_back(
    tiny_server: StackProcess, tiny_model_folder: Path, reliability_recorder: ReliabilityRecorder
) -> None:
    translator = await start_translator(TranslatorConfig(upstream=tiny_server.address))
    base_url = f"{translator.url}/v1"
    try:
        async with unlimited_session() as session:
            body = chat_body("tiny", tiny_prompt(1), 1500, ignore_eos=True)
            async with session.post(f"{base_url}/chat/completions", json=body) as response:
                assert response.status == 200
                lines = []
                async for raw_line in response.content:
                    line = raw_line.decode().strip()
                    if line.startswith("data:"):
                        lines.append(line)
                    if len(lines) == 3:
                        tiny_server.process.send_signal(signal.SIGKILL)
                        break
                rest = (await response.content.read()).decode()
            events = [line for line in rest.splitlines() if line.startswith("data:")]
            assert events[-1] == "data: [DONE]", rest[-500:]
            assert '"error"' in events[-2], "an error event comes right before [DONE]"
            assert "Traceback" not in rest

            tiny_server.process.wait(10)
            refused = [await streamed_chat(session, base_url, chat_body("tiny", tiny_prompt(2), 4)) for _ in range(5)]
            assert [outcome.status for outcome in refused] == [503] * 5

            restarted = await asyncio.to_thread(
                restart_server_process, tiny_server, [f"tiny={tiny_model_folder}"], ["--drain-grace", "5"]
            )
            tiny_server.process = restarted.process
            started = time.monotonic()
            while True:
                again = await streamed_chat(session, base_url, chat_body("tiny", tiny_prompt(3), 4))
                if again.status == 200 or time.monotonic() - started > 30:
                    break
                await asyncio.sleep(0.2)
            recovery_s = time.monotonic() - started
            assert again.status == 200 and again.done and again.error_event is None
    finally:
        await translator.stop()

    reliability_recorder.record(
        "faults.upstream_killed",
        "Faults",
        "server killed (SIGKILL) mid-stream: the translator sent an error event then [DONE], answered 503 "
        "while the server was down, and served again once it was back, without a restart",
        faults_survived=1,
        requests_rejected=len(refused),
        seconds_to_recover_after_restart=round(recovery_s, 2),
        lost=0,
    )


async def test_sigterm_drains_in_flight_and_refuses_new(
    tiny_server: StackProcess, reliability_recorder: ReliabilityRecorder
) -> None:
    max_tokens = 300
    async with grpc.aio.insecure_channel(tiny_server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        in_flight = stub.Generate(greedy_generate_request([5, 6, 7, 8], max_tokens, ignore_eos=True), timeout=60)
        received: list[int] = []
        async for chunk in in_flight:
            for choice in chunk.choices:
                received.extend(choice.token_ids)
            if received:
                break
        signalled = time.monotonic()
        tiny_server.process.send_signal(signal.SIGTERM)
        await _wait_for_not_serving(channel)
        refused = await generate_tokens(stub, greedy_generate_request([1, 2], 4), timeout_s=10)
        assert refused.code == grpc.StatusCode.UNAVAILABLE, refused
        async for chunk in in_flight:
            for choice in chunk.choices:
                received.extend(choice.token_ids)
        assert len(received) == max_tokens, "the in-flight request finished completely"
    exit_code = await asyncio.to_thread(tiny_server.process.wait, DRAIN_GRACE_S + 10)
    exited_s = time.monotonic() - signalled
    assert exit_code == 0 and exited_s < DRAIN_GRACE_S

    reliability_recorder.record(
        "faults.sigterm_drain",
        "Faults",
        "SIGTERM: the in-flight stream finished all its tokens, a new request got UNAVAILABLE, "
        f"the process exited 0 within the {DRAIN_GRACE_S:.0f} s grace",
        faults_survived=1,
        requests_completed=1,
        requests_rejected=1,
        seconds_to_exit=round(exited_s, 2),
        lost=0,
    )
