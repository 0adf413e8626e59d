"""Long runs behind `make soak` (`pytest -m slow`): mixed load for ten minutes on the demo chat model,
and 200 concurrent streams against it. Both use real `serve` and `translate` processes."""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import pytest
from e2e.stack import StackProcess, free_tcp_port, start_server_process, start_translator_process, stop_process

from reliability.clients import chat_body, streamed_chat, unlimited_session
from reliability.recorder import ReliabilityRecorder
from reliability.soak_load import SoakTally, SoakTargets, run_mixed_load

if TYPE_CHECKING:
    from protoserve.server.demo_models import DemoModels


SOAK_SECONDS = float(os.environ.get("PROTOSERVE_SOAK_SECONDS", "600"))
# The soak runs for SOAK_SECONDS; the suite-wide 600 s pytest timeout would cut it, so it gets its own.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(SOAK_SECONDS + 600)]
SAMPLE_EVERY_S = 5.0


def _duration_text(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds >= 120 else f"{seconds:g} seconds"


@dataclass
class DemoProcesses:
    server: StackProcess
    translator: StackProcess
    metrics_port: int

    def kv_blocks_used(self) -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        match = re.search(r'^protoserve_kv_cache_blocks_used\{model="chat"\} ([0-9.e+]+)$', text, re.MULTILINE)
        assert match, "the server's metrics have no protoserve_kv_cache_blocks_used for the chat model"
        return int(float(match.group(1)))

    def server_rss_bytes(self) -> int:
        return int(psutil.Process(self.server.process.pid).memory_info().rss)


@pytest.fixture(scope="module")
def demo_processes(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcesses]:
    folder = tmp_path_factory.mktemp("soak")
    metrics_port = free_tcp_port()
    server = start_server_process(
        [f"chat={demo_models.chat}"], folder / "server.sock", folder / "server.log",
        extra=["--metrics-port", str(metrics_port), "--max-waiting", "100", "--kv-cache-bytes", str(256 << 20)],
    )  # fmt: skip
    translator = start_translator_process(server.address, folder / "translator.log")
    try:
        yield DemoProcesses(server, translator, metrics_port)
    finally:
        stop_process(translator)
        stop_process(server)


async def _sample_until(processes: DemoProcesses, done: asyncio.Event, samples: list[tuple[float, int, int]]) -> None:
    started = time.monotonic()
    while not done.is_set():
        rss, blocks = await asyncio.to_thread(lambda: (processes.server_rss_bytes(), processes.kv_blocks_used()))
        samples.append((time.monotonic() - started, rss, blocks))
        try:
            await asyncio.wait_for(done.wait(), SAMPLE_EVERY_S)
        except TimeoutError:
            pass


async def test_soak_mixed_load(demo_processes: DemoProcesses, reliability_recorder: ReliabilityRecorder) -> None:
    targets = SoakTargets(f"{demo_processes.translator.address}/v1", demo_processes.server.address, "chat")
    tally = SoakTally()
    samples: list[tuple[float, int, int]] = []
    done = asyncio.Event()
    sampler = asyncio.ensure_future(_sample_until(demo_processes, done, samples))
    await run_mixed_load(targets, SOAK_SECONDS, rest_workers=6, tally=tally)
    done.set()
    await sampler
    await asyncio.sleep(1.0)
    blocks_after = await asyncio.to_thread(demo_processes.kv_blocks_used)

    assert tally.errors == [], tally.errors[:5]
    assert blocks_after == 0, "KV blocks in use return to zero when idle"
    after_warm_up = [sample for sample in samples if sample[0] >= SOAK_SECONDS * 0.2]
    assert len(after_warm_up) >= 3
    first_rss = after_warm_up[0][1]
    last_third = after_warm_up[len(after_warm_up) * 2 // 3 :]
    rss_growth = max(rss for _, rss, _ in last_third) - first_rss
    assert rss_growth < max(0.10 * first_rss, 64 << 20), f"RSS grew {rss_growth} bytes after warm-up"
    assert demo_processes.server.running and demo_processes.translator.running

    reliability_recorder.record(
        "soak.mixed_load",
        "Soak",
        f"{_duration_text(SOAK_SECONDS)} of mixed load (streamed and unary chat, n=2 with logprobs, JSON mode, "
        "completions, models, gRPC generate, abandoned clients) on the demo chat model: zero errors, RSS flat "
        "after warm-up, KV blocks back to 0",
        requests_completed=sum(tally.completed.values()),
        requests_cancelled=tally.cancelled,
        errors=len(tally.errors),
        rss_growth_after_warm_up_mib=round(rss_growth / (1 << 20), 1),
        peak_kv_blocks_used=max(blocks for _, _, blocks in samples),
        lost=0,
    )


async def test_two_hundred_streams_on_the_demo_model(
    demo_processes: DemoProcesses, reliability_recorder: ReliabilityRecorder
) -> None:
    base_url = f"{demo_processes.translator.address}/v1"
    async with unlimited_session(timeout_s=600) as session:
        outcomes = await asyncio.gather(
            *(
                streamed_chat(session, base_url, chat_body("chat", f"Say the number {index}.", 4))
                for index in range(200)
            )
        )
        statuses = Counter(outcome.status for outcome in outcomes)
        assert set(statuses) <= {200, 429}, statuses
        assert all(outcome.done and outcome.error_event is None for outcome in outcomes if outcome.status == 200)
        started = time.monotonic()
        fresh = await streamed_chat(session, base_url, chat_body("chat", "Hello!", 4))
        fresh_s = time.monotonic() - started
    assert fresh.status == 200 and fresh_s < 10
    reliability_recorder.record(
        "load.demo_model",
        "Load",
        "200 concurrent streamed chats on the demo chat model (queue limit 100): each completed or got 429, "
        "never a 5xx or a hang; a fresh request was served promptly after",
        requests_completed=statuses[200],
        requests_rejected=statuses[429],
        fresh_request_seconds=round(fresh_s, 2),
        lost=0,
    )
