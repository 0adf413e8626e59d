"""Isolation: many different prompts at once give exactly the tokens each gives alone (greedy).

No cross-request leakage, no dropped or duplicated tokens, round after round (so stale batch slots
or reused KV blocks from an earlier round would show up as a difference).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from protoserve.server.engine.api import EngineConfig
from protoserve.v1 import generation_pb2_grpc

from reliability.clients import generate_tokens, greedy_generate_request
from reliability.recorder import ReliabilityRecorder
from reliability.stack import in_process_stack

PROMPTS = 64
MAX_TOKENS = 8


def isolation_prompts(count: int) -> list[list[int]]:
    """Prompts of 3 to 40 tokens; several share a prefix so the prefix cache is exercised too."""
    prompts = []
    for index in range(count):
        length = 3 + (index * 11) % 38
        shared = [7, 8, 9, 10] if index % 4 == 0 else []
        prompts.append(shared + [(index * 31 + position * 17) % 509 + 1 for position in range(length)])
    return prompts


async def run_isolation(tiny_model_folder: Path, prompts_count: int, rounds: int) -> tuple[int, int]:
    """Returns (requests compared, tokens compared); fails on the first difference."""
    prompts = isolation_prompts(prompts_count)
    engine_config = EngineConfig(kv_cache_bytes=32 << 20, block_size=16, max_num_seqs=64, max_num_batched_tokens=256)
    compared_requests = compared_tokens = 0
    async with in_process_stack(tiny_model_folder, engine_config) as stack:
        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            alone = []
            for prompt in prompts:
                outcome = await generate_tokens(stub, greedy_generate_request(prompt, MAX_TOKENS, ignore_eos=True))
                assert outcome.code == grpc.StatusCode.OK, outcome.details
                assert len(outcome.token_ids) == MAX_TOKENS
                alone.append(outcome.token_ids)
            for round_number in range(rounds):
                together = await asyncio.gather(
                    *(
                        generate_tokens(stub, greedy_generate_request(prompt, MAX_TOKENS, ignore_eos=True))
                        for prompt in prompts
                    )
                )
                for index, outcome in enumerate(together):
                    assert outcome.code == grpc.StatusCode.OK, outcome.details
                    assert outcome.token_ids == alone[index], (
                        f"round {round_number}, prompt {index}: together {outcome.token_ids} != alone {alone[index]}"
                    )
                    compared_requests += 1
                    compared_tokens += len(outcome.token_ids)
        assert stack.stats().kv_blocks_used == 0
    return compared_requests, compared_tokens


async def test_concurrent_greedy_outputs_equal_solo_outputs(
    tiny_model_folder: Path, reliability_recorder: ReliabilityRecorder
) -> None:
    requests, tokens = await run_isolation(tiny_model_folder, PROMPTS, rounds=3)
    reliability_recorder.record(
        "isolation.quick",
        "Isolation",
        f"{PROMPTS} different prompts at once, 3 rounds, greedy: every output equals the prompt's output alone",
        requests_completed=requests + PROMPTS,
        tokens_compared=tokens,
        rounds=3,
        lost=0,
    )


@pytest.mark.slow
async def test_concurrent_greedy_outputs_equal_solo_outputs_many_rounds(
    tiny_model_folder: Path, reliability_recorder: ReliabilityRecorder
) -> None:
    requests, tokens = await run_isolation(tiny_model_folder, PROMPTS, rounds=30)
    reliability_recorder.record(
        "isolation.long",
        "Isolation",
        f"{PROMPTS} different prompts at once, 30 rounds, greedy: every output equals the prompt's output alone",
        requests_completed=requests + PROMPTS,
        tokens_compared=tokens,
        rounds=30,
        lost=0,
    )
