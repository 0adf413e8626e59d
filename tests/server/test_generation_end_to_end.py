"""The generation service over the real AsyncEngine and a tiny random Llama, through grpc.aio and stubs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from protoserve.server.engine.api import EngineConfig
from protoserve.server.engine.async_engine import AsyncEngine
from protoserve.server.engine.loader import loaded_from_model
from protoserve.server.registry import ModelRegistry, ServedGenerationModel
from protoserve.server.services.generation import GenerationServicer
from protoserve.v1 import common_pb2, generation_pb2_grpc
from protoserve.v1 import generation_pb2 as pb
from transformers import LlamaConfig, LlamaForCausalLM

try:
    from .generation_fakes import fake_chat_parsing, server_config, tiny_tokenizer
except ImportError:
    from generation_fakes import fake_chat_parsing, server_config, tiny_tokenizer  # type: ignore[no-redef]


@dataclass
class RealStack:
    stub: generation_pb2_grpc.GenerationServiceStub
    engine: AsyncEngine
    model: LlamaForCausalLM


def tiny_llama() -> LlamaForCausalLM:
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture
async def stack() -> AsyncIterator[RealStack]:
    import copy

    from protoserve.server.model_loading import describe_generation_model

    model = tiny_llama()
    loaded = loaded_from_model(copy.deepcopy(model), tiny_tokenizer(), model_id="tiny-llama")
    engine = AsyncEngine(loaded, EngineConfig(kv_cache_bytes=1 << 22, block_size=4))
    served = ServedGenerationModel(describe_generation_model("tiny-llama", loaded), loaded, engine)
    servicer = GenerationServicer(ModelRegistry([served]), server_config(), None, chat_parsing=fake_chat_parsing())
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RealStack(generation_pb2_grpc.GenerationServiceStub(channel), engine, model)
    finally:
        await channel.close()
        await server.stop(None)
        await engine.shutdown()


def chat_request(max_tokens: int, **sampling: object) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="What is the capital of France?")])],
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **sampling),  # type: ignore[arg-type]
    )


async def test_greedy_chat_matches_plain_generate_and_stream_matches_unary(stack: RealStack) -> None:
    request = chat_request(6, logprobs=True, top_logprobs=2)
    chunks = [chunk async for chunk in stack.stub.Chat(request)]
    result = await stack.stub.ChatUnary(request)

    tokenizer = tiny_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=False
    )
    expected = stack.model.generate(
        torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=tokenizer.pad_token_id
    )[0, len(prompt) :].tolist()
    streamed_ids = [token for chunk in chunks for choice in chunk.choices for token in choice.token_ids]
    assert streamed_ids == expected == list(result.choices[0].token_ids)
    assert result.choices[0].text == "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert result.choices[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [entry.token_id for entry in result.choices[0].logprobs] == expected
    assert all(len(entry.top_logprobs) == 2 for entry in result.choices[0].logprobs)
    assert result.usage.prompt_tokens == len(prompt) and result.usage.completion_tokens == 6
    assert chunks[-1].usage.total_tokens == result.usage.total_tokens and result.model == "tiny-llama"
    assert result.usage.cached_tokens > 0  # the second identical prompt is served from the prefix cache


async def test_n_two_seeded_choices(stack: RealStack) -> None:
    request = chat_request(4, n=2, seed=11)
    request.sampling.temperature = 1.0
    first = await stack.stub.ChatUnary(request)
    again = await stack.stub.ChatUnary(request)
    assert [choice.index for choice in first.choices] == [0, 1]
    assert all(len(choice.token_ids) == 4 for choice in first.choices)
    assert [list(c.token_ids) for c in first.choices] == [list(c.token_ids) for c in again.choices]
    assert first.usage.completion_tokens == 8


async def test_same_caller_id_twice_at_once(stack: RealStack) -> None:
    request = chat_request(3)
    request.options.request_id = "shared"
    results = await asyncio.gather(stack.stub.ChatUnary(request), stack.stub.ChatUnary(request))
    assert [result.request_id for result in results] == ["shared", "shared"]
    assert results[0].choices[0].token_ids == results[1].choices[0].token_ids


async def test_cancelled_stream_frees_the_engine(stack: RealStack) -> None:
    call = stack.stub.Chat(chat_request(200))
    await call.read()
    call.cancel()
    for _ in range(200):
        stats = stack.engine.stats()
        if stats.running_requests == 0 and stats.waiting_requests == 0:
            break
        await asyncio.sleep(0.02)
    stats = stack.engine.stats()
    assert stats.running_requests == 0 and stats.waiting_requests == 0
    follow_up = await stack.stub.ChatUnary(chat_request(2))
    assert len(follow_up.choices[0].token_ids) == 2


async def test_prompt_too_long_for_the_real_engine(stack: RealStack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.stub.ChatUnary(chat_request(250))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context length is 256" in raised.value.details()
