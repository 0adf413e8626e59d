"""Health tells the truth (starting, serving, engine dead, draining); a drain lets in-flight calls finish."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from protoserve.server.app import start_server
from protoserve.server.cli import serve
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.registry import ModelRegistry, ServedGenerationModel
from protoserve.v1 import models_pb2, models_pb2_grpc, transcription_pb2, transcription_pb2_grpc

from .runtime_fakes import (
    FakeEngine,
    FakeGenerationServicer,
    FakeSpeechModel,
    generation_model,
    running_server,
    speech_model,
    target,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return response.status


async def _read_rest(call: grpc.aio.UnaryStreamCall) -> list[transcription_pb2.TranscriptionChunk]:
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    return chunks


async def test_serving_after_start_per_service() -> None:
    async with running_server([generation_model("tiny"), speech_model("whisper")]) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            assert await _health(channel) == SERVING
            assert await _health(channel, "protoserve.v1.GenerationService") == SERVING
            assert await _health(channel, "protoserve.v1.TranscriptionService") == SERVING
            assert await _health(channel, "protoserve.v1.ModelService") == SERVING


async def test_warm_up_runs_one_tiny_generation_before_serving() -> None:
    engine = FakeEngine()
    async with running_server([generation_model("tiny", engine)]):
        assert len(engine.requests) == 1
        assert engine.requests[0].params.max_tokens == 1


async def test_speech_only_server_does_not_claim_generation() -> None:
    async with running_server([speech_model("whisper")]) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            assert await _health(channel, "protoserve.v1.TranscriptionService") == SERVING
            assert await _health(channel, "protoserve.v1.GenerationService") == NOT_SERVING


async def test_dead_engine_turns_health_not_serving() -> None:
    engine = FakeEngine()
    async with running_server([generation_model("tiny", engine)], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            assert await _health(channel) == SERVING
            engine.alive = False
            await running.health.refresh()  # the monitor does this every second
            assert await _health(channel) == NOT_SERVING
            assert await _health(channel, "protoserve.v1.GenerationService") == NOT_SERVING


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_not_serving_and_unavailable_while_models_load() -> None:
    release = asyncio.Event()

    class SlowLoader:
        def resolve(self, model_id: str) -> None:
            return None

        async def load(self, spec: ModelSpec) -> ServedGenerationModel:
            await release.wait()
            return generation_model(spec.model_id)

    registry = ModelRegistry(loader=SlowLoader(), startup_specs=[ModelSpec("tiny", "/nowhere")])
    port = _free_port()
    starting = asyncio.ensure_future(
        start_server(
            ServerConfig(port=port, warm_up=False), registry, generation_servicer=FakeGenerationServicer(registry)
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.channel_ready()
            assert await _health(channel) == NOT_SERVING
            models = models_pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await models.ListModels(models_pb2.ListModelsRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in (refused.value.details() or "")
            release.set()
            await asyncio.wait_for(starting, 5)
            assert await _health(channel) == SERVING
            listed = await models.ListModels(models_pb2.ListModelsRequest(), timeout=5)
            assert [model.id for model in listed.models] == ["tiny"]
    finally:
        release.set()
        await (await starting).abort()


async def test_drain_lets_in_flight_stream_finish_and_refuses_new_calls() -> None:
    speech = FakeSpeechModel(windows=4, window_delay=0.15)
    async with running_server([speech_model("whisper", speech)], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = transcription_pb2_grpc.TranscriptionServiceStub(channel)
            call = stub.Transcribe(transcription_pb2.TranscribeRequest(audio=b"RIFF....WAVE"))
            first = await call.read()
            assert first.segments[0].text == " part 0."
            draining = asyncio.ensure_future(running.drain(5.0))
            await asyncio.sleep(0.05)
            assert await _health(channel) == NOT_SERVING
            models = models_pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await models.ListModels(models_pb2.ListModelsRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            rest = await _read_rest(call)
            assert rest[-1].done and rest[-1].text == "part 0. part 1. part 2. part 3."
            assert await call.code() == grpc.StatusCode.OK
            await asyncio.wait_for(draining, 5)
    assert not speech.closed_early


async def test_drain_grace_cuts_calls_that_run_too_long() -> None:
    speech = FakeSpeechModel(windows=50, window_delay=0.1)
    async with running_server([speech_model("whisper", speech)], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = transcription_pb2_grpc.TranscriptionServiceStub(channel)
            call = stub.Transcribe(transcription_pb2.TranscribeRequest(audio=b"x"))
            await call.read()
            loop = asyncio.get_running_loop()
            started = loop.time()
            await running.drain(0.3)
            assert loop.time() - started < 2.0
            with pytest.raises(grpc.aio.AioRpcError):
                await _read_rest(call)


async def test_reflection_lists_every_service() -> None:
    async with running_server([generation_model("tiny")], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def requests():  # type: ignore[no-untyped-def]
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            responses = [response async for response in stub.ServerReflectionInfo(requests())]
    names = {service.name for service in responses[0].list_services_response.service}
    assert names >= {
        "protoserve.v1.GenerationService",
        "protoserve.v1.TranscriptionService",
        "protoserve.v1.ModelService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def _serve_with_slow_transcription(tmp_path: Path, signals: int) -> tuple[int, list[object], float]:
    """Run `cli.serve` on a unix socket, start a slow transcription, send `signals` SIGTERMs."""
    socket_path = tmp_path / "serve.sock"
    speech = FakeSpeechModel(windows=6, window_delay=0.1)
    config = ServerConfig(port=None, unix_socket=str(socket_path), drain_grace_seconds=5.0, warm_up=False)
    serving = asyncio.ensure_future(serve(config, ModelRegistry([speech_model("whisper", speech)])))
    while not socket_path.exists():
        await asyncio.sleep(0.02)
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = transcription_pb2_grpc.TranscriptionServiceStub(channel)
        call = stub.Transcribe(transcription_pb2.TranscribeRequest(audio=b"x"))
        await call.read()
        started = asyncio.get_running_loop().time()
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)
        outcome: list[object] = []
        try:
            outcome.extend(await _read_rest(call))
        except grpc.aio.AioRpcError as error:
            outcome.append(error.code())
        exit_code = await asyncio.wait_for(serving, 10)
        return exit_code, outcome, asyncio.get_running_loop().time() - started


async def test_sigterm_drains_in_flight_work_then_exits_0(tmp_path: Path) -> None:
    exit_code, outcome, _ = await _serve_with_slow_transcription(tmp_path, signals=1)
    assert exit_code == 0
    last = outcome[-1]
    assert isinstance(last, transcription_pb2.TranscriptionChunk) and last.done


async def test_second_sigterm_aborts_at_once(tmp_path: Path) -> None:
    exit_code, outcome, elapsed = await _serve_with_slow_transcription(tmp_path, signals=2)
    assert exit_code == 1
    assert outcome[-1] == grpc.StatusCode.CANCELLED or outcome[-1] == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 0.45  # the stream alone needs 0.5 s more


async def test_health_watchers_do_not_hold_up_a_drain() -> None:
    async with running_server([generation_model("tiny")], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            loop = asyncio.get_running_loop()
            started = loop.time()
            await running.drain(20.0)
            assert loop.time() - started < 3.0
            seen = []
            try:
                while (message := await watch.read()) is not grpc.aio.EOF:
                    seen.append(message.status)
            except grpc.aio.AioRpcError:
                pass
            assert NOT_SERVING in seen
