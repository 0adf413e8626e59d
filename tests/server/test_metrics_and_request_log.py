"""The /metrics endpoint serves request, token, latency and engine metrics; one log line per request."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import grpc
import grpc.aio
import pytest
from protoserve.server.engine.api import EngineStats
from protoserve.server.metrics import ServerMetrics
from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc

from .runtime_fakes import FakeEngine, generation_model, running_server, target


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def _generate(
    channel: grpc.aio.Channel, request_id: str = "", user: str = ""
) -> list[generation_pb2.GenerationChunk]:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    options = common_pb2.RequestOptions(request_id=request_id, user=user)
    request = generation_pb2.GenerateRequest(text="hi", options=options)
    call = stub.Generate(request, timeout=5)
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    return chunks


async def test_metrics_endpoint_serves_every_family() -> None:
    async with running_server([generation_model("tiny")], metrics_port=0, warm_up=False) as running:
        assert running.metrics_port
        async with grpc.aio.insecure_channel(target(running)) as channel:
            await _generate(channel)
            models = models_pb2_grpc.ModelServiceStub(channel)
            await models.ListModels(models_pb2.ListModelsRequest())
            with pytest.raises(grpc.aio.AioRpcError):
                await models.GetModel(models_pb2.GetModelRequest(id="nope"))
        text = await asyncio.to_thread(_scrape, running.metrics_port)
    for name in (
        "protoserve_requests_total",
        "protoserve_prompt_tokens_total",
        "protoserve_completion_tokens_total",
        "protoserve_engine_queue_depth",
        "protoserve_engine_running_requests",
        "protoserve_kv_cache_blocks_used",
        "protoserve_kv_cache_blocks_total",
        "protoserve_prefix_cache_hit_rate",
        "protoserve_time_to_first_token_seconds_bucket",
        "protoserve_inter_token_latency_seconds",
        "protoserve_engine_alive",
        "protoserve_speculative_draft_tokens",
        "protoserve_speculative_accepted_tokens",
    ):
        assert name in text, name
    assert 'protoserve_requests_total{code="OK",model="",rpc="ListModels"} 1.0' in text
    assert 'protoserve_requests_total{code="NOT_FOUND",model="unknown",rpc="GetModel"} 1.0' in text
    assert 'protoserve_kv_cache_blocks_total{model="tiny"} 100.0' in text
    assert 'protoserve_prefix_cache_hit_rate{model="tiny"} 0.4' in text
    assert 'protoserve_speculative_draft_tokens{model="tiny"} 12.0' in text
    assert 'protoserve_speculative_accepted_tokens{model="tiny"} 5.0' in text
    assert 'protoserve_completion_tokens_total{model="tiny"} 3.0' in text


def test_engine_collector_survives_a_failing_source() -> None:
    metrics = ServerMetrics()

    def broken() -> dict[str, EngineStats]:
        raise RuntimeError("engine gone")

    metrics.watch_engines(broken)
    assert b"protoserve_engine_alive" in metrics.render()


def test_servicer_methods_record_values() -> None:
    metrics = ServerMetrics()
    metrics.request_started("m", "Chat")
    metrics.first_token("m", 0.2)
    metrics.inter_token("m", 0.01)
    metrics.tokens("m", prompt=10, completion=5)
    metrics.request_finished("m", "Chat", "OK")
    text = metrics.render().decode()
    assert 'protoserve_requests_total{code="OK",model="m",rpc="Chat"} 1.0' in text
    assert 'protoserve_requests_in_progress{model="m",rpc="Chat"} 0.0' in text
    assert 'protoserve_prompt_tokens_total{model="m"} 10.0' in text
    assert 'protoserve_inter_token_latency_seconds_count{model="m"} 1.0' in text


async def test_one_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="protoserve.server.requests")
    engine = FakeEngine()
    async with running_server([generation_model("tiny", engine)], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            chunks = await _generate(channel)
            await _generate(channel, request_id="mine-42", user="end-user-7")
            with pytest.raises(grpc.aio.AioRpcError):
                await models_pb2_grpc.ModelServiceStub(channel).GetModel(models_pb2.GetModelRequest(id="x"))
    lines = [record.getMessage() for record in caplog.records if record.name == "protoserve.server.requests"]
    assert len(lines) == 3
    made_id = chunks[0].request_id
    assert made_id.startswith("req-") and engine.requests[0].request_id == made_id
    assert lines[0].startswith(
        f"request {made_id} model=tiny rpc=Generate status=OK prompt_tokens=3 completion_tokens=3"
    )
    assert lines[1].startswith("request mine-42 ") and lines[1].endswith(" user=end-user-7")
    assert lines[0].endswith(" user=-")
    assert "rpc=GetModel status=NOT_FOUND" in lines[2]


async def test_log_lines_cannot_be_forged_by_request_ids(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="protoserve.server.requests")
    async with running_server([generation_model("tiny")], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            await _generate(
                channel, request_id="x\nrequest forged status=OK" + "y" * 500, user="u\nforged " + "z" * 500
            )
    lines = [record.getMessage() for record in caplog.records if record.name == "protoserve.server.requests"]
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 400
