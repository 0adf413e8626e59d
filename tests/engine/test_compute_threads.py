"""Compute threads: the server's main thread gives up its OpenMP pool; engine and speech threads
run torch with the reserved count (see server/engine/compute_threads.py for why)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator

import pytest
import torch
from protoserve.server.engine import compute_threads
from protoserve.server.engine.api import EngineConfig, EngineRequest
from protoserve.server.engine.async_engine import AsyncEngine
from protoserve.server.engine.loader import loaded_from_model

from .engine_fixtures import build_model, greedy, tiny_llama_config, word_tokenizer


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    compute_threads.release()
    torch.set_num_threads(before)


def threads_seen_in_new_thread(work=lambda: None) -> int:
    seen: list[int] = []

    def run() -> None:
        work()
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


def test_reserve_sets_the_caller_to_one_thread_and_enter_gives_the_count(restore_threads: None) -> None:
    assert compute_threads.reserve(3) == 3
    assert compute_threads.reserved() == 3
    assert torch.get_num_threads() == 1
    assert threads_seen_in_new_thread(compute_threads.enter) == 3
    assert torch.get_num_threads() == 1  # entering elsewhere leaves the main thread alone


def test_reserve_without_a_count_keeps_torchs_default(restore_threads: None) -> None:
    default = torch.get_num_threads()
    assert compute_threads.reserve(None) == default
    assert threads_seen_in_new_thread(compute_threads.enter) == default


def test_enter_without_a_reservation_changes_nothing(restore_threads: None) -> None:
    compute_threads.release()
    torch.set_num_threads(1)
    compute_threads.enter()
    assert torch.get_num_threads() == 1


def test_reserve_refuses_zero(restore_threads: None) -> None:
    with pytest.raises(ValueError, match="1 or more"):
        compute_threads.reserve(0)


async def test_the_engine_thread_computes_with_the_reserved_count(restore_threads: None) -> None:
    compute_threads.reserve(2)
    seen: list[tuple[str, int]] = []
    model = build_model(tiny_llama_config())
    engine = AsyncEngine(
        loaded_from_model(copy.deepcopy(model), word_tokenizer()), EngineConfig(kv_cache_bytes=1 << 20, block_size=4)
    )
    try:
        original = engine.engine.runner.execute

        def recording_execute(output):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return original(output)

        engine.engine.runner.execute = recording_execute  # type: ignore[method-assign]
        outputs = [output async for output in engine.generate(EngineRequest("t", (5, 6, 7), greedy(3)))]
    finally:
        await engine.shutdown()
    assert outputs[-1].finished
    assert seen and all(name == "protoserve-engine" and threads == 2 for name, threads in seen)
    assert torch.get_num_threads() == 1
