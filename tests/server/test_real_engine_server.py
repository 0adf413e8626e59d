"""The whole runtime with a real (tiny, random) model: loaded from a folder through the engine's
loader, warmed up, served by the real GenerationServicer, health, models and metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve.server.app import RunningServer, start_server
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.engine.api import EngineConfig
from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB_SIZE = 300


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE - 1)} | {"<eos>": VOCAB_SIZE - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=0,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
async def server(tiny_model_folder: Path) -> AsyncIterator[RunningServer]:
    config = ServerConfig(
        models=(ModelSpec("tiny", str(tiny_model_folder)),),
        port=0,
        device="cpu",
        metrics_port=0,
        engine=EngineConfig(kv_cache_bytes=1 << 20, block_size=4, max_waiting_requests=4),
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await running.drain(2.0)


async def test_generate_health_models_and_metrics(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[0]}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        info = await models_pb2_grpc.ModelServiceStub(channel).GetModel(models_pb2.GetModelRequest(id="tiny"))
        assert info.architecture == "LlamaForCausalLM" and info.context_length == 128 and info.device == "cpu"
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=[5, 6, 7]),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        )
        result = await stub.GenerateUnary(request, timeout=30)
        assert result.usage.prompt_tokens == 3 and result.usage.completion_tokens == 4
        too_long = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=[5] * 120),
            sampling=common_pb2.SamplingParams(max_tokens=50),
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateUnary(too_long, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "128" in (caught.value.details() or "")
    port = server.metrics_port
    assert port is not None
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    assert 'protoserve_engine_alive{model="tiny"} 1.0' in text
    assert 'protoserve_completion_tokens_total{model="tiny"} 4.0' in text
