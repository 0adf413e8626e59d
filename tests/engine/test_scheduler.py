"""Scheduler policy: decodes before prefill chunks, the token budget, and who gets preempted."""

from __future__ import annotations

import pytest
from protoserve.server.engine.api import EngineConfig, EngineRequest
from protoserve.server.engine.scheduler import Scheduler
from protoserve.server.engine.sequence import RequestState, Sequence, SequenceStatus

_arrivals = iter(range(10**6))


def add(scheduler: Scheduler, name: str, prompt_length: int, priority: int = 0) -> Sequence:
    arrival = next(_arrivals)
    prompt = tuple(range(arrival * 100, arrival * 100 + prompt_length))  # distinct: no prefix sharing
    request = EngineRequest(name, prompt, priority=priority)
    state = RequestState.create(request, arrival, 10_000, None)
    scheduler.add_request(state)
    return state.sequences[0]


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule, pretend the model ran, append token 7 to every sequence that samples."""
    output = scheduler.schedule()
    sampled = {item.sequence: [7] for item in output.scheduled if item.needs_sample}
    scheduler.update_from_output(output, sampled)
    return {item.sequence.request.request_id: item.num_new_tokens for item in output.scheduled}


def test_config_must_allow_work() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Scheduler(EngineConfig(max_num_batched_tokens=0), 10)


def test_long_prompt_is_chunked_and_never_starves_decodes() -> None:
    scheduler = Scheduler(EngineConfig(block_size=4, max_num_batched_tokens=8), 64)
    add(scheduler, "short", 3)
    assert run_step(scheduler) == {"short": 3}
    add(scheduler, "long", 30)
    chunks = [run_step(scheduler) for _ in range(5)]
    assert all(step["short"] == 1 for step in chunks)  # the decode runs every step
    assert [step.get("long", 0) for step in chunks] == [7, 7, 7, 7, 2]
    assert all(sum(step.values()) <= 8 for step in chunks)


def test_max_num_seqs_caps_a_step() -> None:
    scheduler = Scheduler(EngineConfig(block_size=4, max_num_seqs=2), 64)
    for index in range(3):
        add(scheduler, f"r{index}", 2)
    assert set(run_step(scheduler)) == {"r0", "r1"}
    assert scheduler.num_waiting_requests == 1


def test_lowest_priority_latest_arrival_is_preempted_first() -> None:
    scheduler = Scheduler(EngineConfig(block_size=2, max_num_batched_tokens=64), 7)
    important = add(scheduler, "important", 3, priority=5)
    early = add(scheduler, "early", 3)
    late = add(scheduler, "late", 3)
    run_step(scheduler)  # each holds 2 blocks for its 3 prompt tokens; 1 block free
    run_step(scheduler)  # the 4th token still fits in 2 blocks
    run_step(scheduler)  # each wants a 3rd block for its 5th token: only one is free
    assert late.status == SequenceStatus.PREEMPTED and late.num_computed_tokens == 0
    assert important.status == early.status == SequenceStatus.RUNNING
    assert scheduler.num_preemptions >= 1
    assert scheduler.waiting == [late]


def test_waiting_order_is_priority_then_arrival() -> None:
    scheduler = Scheduler(EngineConfig(), 64)
    add(scheduler, "a", 2)
    add(scheduler, "b", 2, priority=3)
    add(scheduler, "c", 2)
    add(scheduler, "d", 2, priority=3)
    assert [s.request.request_id for s in scheduler.waiting] == ["b", "d", "a", "c"]
