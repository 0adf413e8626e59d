"""Load: 200 concurrent streamed chats through the translator; the queue limit rejects exactly the excess.

The engine is held (a step hook that blocks) while the requests arrive, so the arithmetic is exact:
one request is running, `MAX_WAITING` fit in the queue, every other one gets 429 at once. Released,
every accepted request completes; then the server still serves a fresh request promptly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

from protoserve.server.engine.api import EngineConfig

from reliability.clients import chat_body, streamed_chat, unlimited_session
from reliability.recorder import ReliabilityRecorder
from reliability.stack import in_process_stack, tiny_prompt, wait_until

CONCURRENT_REQUESTS = 200
MAX_WAITING = 40
MAX_TOKENS = 4


class EngineHold:
    """A step hook that blocks the engine thread until released; `entered` is set once it blocks."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        if not self.released.wait(timeout=60):
            raise RuntimeError("the test never released the engine")


async def test_concurrent_streams_complete_or_get_429(
    tiny_model_folder: Path, reliability_recorder: ReliabilityRecorder
) -> None:
    engine_config = EngineConfig(
        kv_cache_bytes=16 << 20, block_size=16, max_num_seqs=64, max_waiting_requests=MAX_WAITING
    )
    async with in_process_stack(tiny_model_folder, engine_config) as stack, unlimited_session() as session:
        engine = await stack.engine()
        hold = EngineHold()
        engine.inject_step_fault(hold)

        def send(index: int) -> asyncio.Task:
            body = chat_body(stack.model_id, tiny_prompt(index), MAX_TOKENS, ignore_eos=True)
            return asyncio.ensure_future(streamed_chat(session, stack.base_url, body))

        first = send(0)
        await wait_until(hold.entered.is_set, 30, "the first request reaching the engine")
        rest = [send(index) for index in range(1, CONCURRENT_REQUESTS)]
        # Every other request must be queued for admission before the engine moves again.
        all_pending = CONCURRENT_REQUESTS - 1
        await wait_until(lambda: engine.stats().pending_requests == all_pending, 60, "all requests arriving")
        engine.inject_step_fault(None)
        hold.released.set()
        started = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=120)
        drained_s = time.monotonic() - started

        statuses = Counter(outcome.status for outcome in outcomes)
        assert set(statuses) <= {200, 429}, f"only 200 or 429, got {statuses}"
        accepted = [outcome for outcome in outcomes if outcome.status == 200]
        assert len(accepted) == 1 + MAX_WAITING, statuses
        assert statuses[429] == CONCURRENT_REQUESTS - 1 - MAX_WAITING
        for outcome in accepted:
            assert outcome.done and outcome.error_event is None and outcome.usage is not None
            assert outcome.usage["completion_tokens"] == MAX_TOKENS
        assert all("retry" in outcome.body.lower() for outcome in outcomes if outcome.status == 429)

        fresh_started = time.monotonic()
        fresh = await streamed_chat(session, stack.base_url, chat_body(stack.model_id, tiny_prompt(999), MAX_TOKENS))
        fresh_s = time.monotonic() - fresh_started
        assert fresh.status == 200 and fresh.done and fresh_s < 5.0
        # The reply can reach the client a moment before the engine's stats snapshot is refreshed.
        await wait_until(
            lambda: stack.stats().running_requests == 0 and stack.stats().waiting_requests == 0,
            5,
            "the engine going idle after the fresh request",
        )
        stats = stack.stats()
        assert stats.alive and stats.kv_blocks_used == 0

    reliability_recorder.record(
        "load.queue_limit",
        "Load",
        f"{CONCURRENT_REQUESTS} concurrent streamed chats through the translator, queue limit {MAX_WAITING}: "
        "the excess got 429 at once, every accepted request completed, no 5xx, no hang",
        requests_completed=len(accepted) + 1,
        requests_rejected=statuses[429],
        concurrent_requests=CONCURRENT_REQUESTS,
        queue_limit=MAX_WAITING,
        seconds_to_finish_accepted=round(drained_s, 2),
        fresh_request_seconds=round(fresh_s, 3),
        lost=0,
    )
