"""Faults inside the server: an exception injected into an engine step, and a KV cache too small.

A failing step fails only the requests it ran (their streams end with an error event, then
[DONE]); requests still queued complete; the engine stays alive. A request that can never fit in
the KV cache is RESOURCE_EXHAUSTED (429 over REST), and many requests that only fit a few at a time
all complete, without a crash.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import grpc.aio
from protoserve.server.engine.api import EngineConfig
from protoserve.v1 import generation_pb2_grpc

from reliability.clients import chat_body, generate_tokens, greedy_generate_request, streamed_chat, unlimited_session
from reliability.recorder import ReliabilityRecorder
from reliability.stack import in_process_stack, tiny_prompt

KV_BYTES_PER_BLOCK = 2 * 2 * 2 * 16 * 4 * 16  # (k, v) x layers x kv heads x head dim x fp32 x block size


class FailOnce:
    """A step hook that slows every step a little and raises in step number `fail_at` only."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.calls += 1
            calls = self.calls
        time.sleep(0.01)
        if calls == self.fail_at:
            raise RuntimeError("injected step fault")


async def test_step_fault_fails_only_the_running_requests(
    tiny_model_folder: Path, reliability_recorder: ReliabilityRecorder
) -> None:
    engine_config = EngineConfig(kv_cache_bytes=16 << 20, block_size=16, max_num_seqs=2)
    async with in_process_stack(tiny_model_folder, engine_config) as stack, unlimited_session() as session:
        engine = await stack.engine()
        fault = FailOnce(fail_at=3)
        engine.inject_step_fault(fault)
        bodies = [chat_body(stack.model_id, tiny_prompt(index), 24, ignore_eos=True) for index in range(8)]
        outcomes = await asyncio.gather(*(streamed_chat(session, stack.base_url, body) for body in bodies))
        engine.inject_step_fault(None)

        assert all(outcome.status == 200 and outcome.done for outcome in outcomes)
        failed = [outcome for outcome in outcomes if outcome.error_event is not None]
        completed = [outcome for outcome in outcomes if outcome.error_event is None]
        assert 1 <= len(failed) <= 2, "only the requests of the failing step fail"
        for outcome in failed:
            message = str(outcome.error_event.get("message", ""))  # type: ignore[union-attr]
            assert "Traceback" not in message and "0x" not in message
        for outcome in completed:
            assert outcome.usage is not None and outcome.usage["completion_tokens"] == 24
        fresh = await streamed_chat(session, stack.base_url, chat_body(stack.model_id, tiny_prompt(50), 4))
        assert fresh.status == 200 and fresh.error_event is None and fresh.done
        stats = stack.stats()
        assert stats.alive and stats.kv_blocks_used == 0

    reliability_recorder.record(
        "faults.engine_step_exception",
        "Faults",
        "an exception injected into one engine step failed only the requests in that step "
        "(error event, then [DONE]); queued requests completed; the engine stayed alive",
        faults_survived=1,
        requests_failed_by_fault=len(failed),
        requests_completed=len(completed) + 1,
        lost=0,
    )


async def test_kv_cache_exhaustion_is_resource_exhausted(
    tiny_model_folder: Path, reliability_recorder: ReliabilityRecorder
) -> None:
    blocks = 8
    engine_config = EngineConfig(kv_cache_bytes=blocks * KV_BYTES_PER_BLOCK, block_size=16, max_num_seqs=16)
    async with in_process_stack(tiny_model_folder, engine_config) as stack, unlimited_session() as session:
        assert stack.stats().kv_blocks_total == blocks
        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            too_big = await generate_tokens(stub, greedy_generate_request([3] * (blocks * 16 + 20), 4))
            assert too_big.code == grpc.StatusCode.RESOURCE_EXHAUSTED, too_big
            # Sixteen requests of four blocks each, in a cache of eight: they take turns, all complete.
            crowded = await asyncio.gather(
                *(
                    generate_tokens(stub, greedy_generate_request([index + 1] * 20, 40, ignore_eos=True))
                    for index in range(16)
                )
            )
            assert all(outcome.code == grpc.StatusCode.OK and len(outcome.token_ids) == 40 for outcome in crowded)
        rest = await streamed_chat(
            session, stack.base_url, chat_body(stack.model_id, " ".join(["w3"] * (blocks * 16 + 20)), 4)
        )
        assert rest.status == 429, rest
        stats = stack.stats()
        assert stats.alive and stats.kv_blocks_used == 0

    reliability_recorder.record(
        "faults.kv_cache_exhausted",
        "Faults",
        "a request larger than the whole KV cache got RESOURCE_EXHAUSTED (429 over REST), not a crash; "
        "16 requests sharing a cache that holds 2 of them at a time all completed",
        faults_survived=2,
        requests_completed=16,
        kv_blocks_total=blocks,
        lost=0,
    )
