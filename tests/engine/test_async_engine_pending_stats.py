"""`EngineStats.pending_requests`: requests accepted by the async bridge but not yet admitted, read
live by `AsyncEngine.stats()` and reported as the `protoserve_engine_pending_requests` gauge."""

from __future__ import annotations

import asyncio
import copy
import re
import threading

from protoserve.server.engine.api import EngineConfig, EngineRequest, RequestOutput
from protoserve.server.engine.async_engine import AsyncEngine
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.loader import loaded_from_model
from protoserve.server.metrics import ServerMetrics

from .engine_fixtures import build_model, greedy, tiny_llama_config, word_tokenizer

HELD_BACK = 5


class StepHold:
    """A step hook that blocks the engine thread until released; `entered` is set once it blocks."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        if not self.released.wait(timeout=30):
            raise RuntimeError("the test never released the engine")


async def collect(engine: AsyncEngine, request: EngineRequest) -> list[RequestOutput]:
    return [output async for output in engine.generate(request)]


async def wait_until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def pending_gauge(metrics: ServerMetrics, model: str) -> float:
    text = metrics.render().decode()
    match = re.search(rf'^protoserve_engine_pending_requests\{{model="{model}"\}} (\S+)$', text, re.MULTILINE)
    assert match is not None, "the pending-requests gauge is missing"
    return float(match.group(1))


async def test_pending_requests_are_counted_until_admitted_and_scraped() -> None:
    model = build_model(tiny_llama_config())
    engine = AsyncEngine(
        loaded_from_model(copy.deepcopy(model), word_tokenizer()), EngineConfig(kv_cache_bytes=1 << 20, block_size=4)
    )
    metrics = ServerMetrics()
    metrics.watch_engines(lambda: {"tiny": engine.stats()})
    hold = StepHold()
    try:
        assert engine.stats().pending_requests == 0 and pending_gauge(metrics, "tiny") == 0
        engine.inject_step_fault(hold)
        first = asyncio.ensure_future(collect(engine, EngineRequest("first", (3, 4, 5), greedy(2))))
        await wait_until(hold.entered.is_set)
        held = [
            asyncio.ensure_future(collect(engine, EngineRequest(f"held{i}", (3, 4, 5 + i), greedy(2))))
            for i in range(HELD_BACK)
        ]
        await wait_until(lambda: engine.stats().pending_requests == HELD_BACK)
        assert engine.stats().waiting_requests == 0, "pending requests are not in the scheduler's queue"
        assert pending_gauge(metrics, "tiny") == HELD_BACK

        engine.inject_step_fault(None)
        hold.released.set()
        outputs = await asyncio.wait_for(asyncio.gather(first, *held), timeout=30)
        assert all(stream[-1].finished for stream in outputs)
        await wait_until(lambda: engine.stats().running_requests == 0)
        assert engine.stats().pending_requests == 0 and pending_gauge(metrics, "tiny") == 0
    finally:
        hold.released.set()
        await engine.shutdown()


def test_the_synchronous_engine_has_nothing_pending() -> None:
    model = build_model(tiny_llama_config())
    engine = LLMEngine(loaded_from_model(model, word_tokenizer()), EngineConfig(kv_cache_bytes=1 << 20, block_size=4))
    engine.add_request(EngineRequest("queued", (3, 4, 5), greedy(2)))
    stats = engine.stats()
    assert (stats.waiting_requests, stats.pending_requests) == (1, 0)
