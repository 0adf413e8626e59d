"""The async bridge: streaming, cancellation, errors before the first output, step faults, shutdown."""

from __future__ import annotations

import asyncio
import copy

import pytest
from protoserve.server.engine.api import EngineConfig, EngineRequest, RequestOutput, SamplingParams
from protoserve.server.engine.async_engine import AsyncEngine
from protoserve.server.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    PromptTooLongError,
    RequestFailedError,
)
from protoserve.server.engine.loader import loaded_from_model

from .engine_fixtures import build_model, greedy, random_prompts, reference_greedy, tiny_llama_config, word_tokenizer


@pytest.fixture(scope="module")
def llama():
    return build_model(tiny_llama_config())


@pytest.fixture
async def make_async_engine(llama):
    engines: list[AsyncEngine] = []

    def make(**config: object) -> AsyncEngine:
        settings: dict[str, object] = {"kv_cache_bytes": 1 << 20, "block_size": 4}
        settings.update(config)
        engine = AsyncEngine(loaded_from_model(copy.deepcopy(llama), word_tokenizer()), EngineConfig(**settings))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


async def collect(engine: AsyncEngine, request: EngineRequest) -> list[RequestOutput]:
    return [output async for output in engine.generate(request)]


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_concurrent_streams_match_generate(llama, make_async_engine) -> None:
    engine = make_async_engine()
    prompts = random_prompts(5, 3, 25, seed=21)
    requests = [EngineRequest(f"a{i}", tuple(p), greedy(8)) for i, p in enumerate(prompts)]
    streams = await asyncio.gather(*(collect(engine, request) for request in requests))
    for prompt, outputs in zip(prompts, streams, strict=True):
        assert outputs[-1].finished and outputs[-1].usage is not None
        assert not any(output.finished for output in outputs[:-1])
        tokens = [token for output in outputs for delta in output.deltas for token in delta.token_ids]
        assert tokens == reference_greedy(llama, prompt, 8)
    assert engine.stats().kv_blocks_used == 0


async def test_a_steps_stats_are_published_before_its_outputs_go_out(make_async_engine) -> None:
    """A caller that got its last output reads stats where the request's KV blocks are free (they
    were published after the outputs, so a fast caller saw the previous step's counts)."""
    engine = make_async_engine()
    blocks_seen_at_the_end: list[int] = []
    deliver = engine._deliver_step_outputs

    def recording(outputs: list[RequestOutput]) -> None:
        if any(output.finished for output in outputs):
            blocks_seen_at_the_end.append(engine.stats().kv_blocks_used)
        deliver(outputs)

    engine._deliver_step_outputs = recording  # type: ignore[method-assign]
    await collect(engine, EngineRequest("only", (2, 3, 4, 5, 6), greedy(6)))
    assert blocks_seen_at_the_end == [0]


async def test_errors_come_before_the_first_output(make_async_engine) -> None:
    engine = make_async_engine(max_waiting_requests=1, max_num_seqs=1)
    with pytest.raises(PromptTooLongError):
        await collect(engine, EngineRequest("long", tuple([3] * 300), greedy(4)))
    first = engine.generate(EngineRequest("first", (2, 3), greedy(50, ignore_eos=True)))
    await first.__anext__()
    second = engine.generate(EngineRequest("second", (2, 3), greedy(4)))
    second_task = asyncio.create_task(second.__anext__())
    await wait_until(lambda: engine.stats().waiting_requests == 1)
    third = engine.generate(EngineRequest("third", (2, 3), greedy(4)))
    with pytest.raises(EngineOverloadedError):
        await third.__anext__()
    await first.aclose()
    assert (await second_task).request_id == "second"
    await second.aclose()


async def test_cancelled_request_is_aborted_and_frees_its_blocks(make_async_engine) -> None:
    engine = make_async_engine()

    async def consume() -> None:
        async for _ in engine.generate(
            EngineRequest("endless", (2, 3, 4), SamplingParams(temperature=0.0, ignore_eos=True))
        ):
            pass

    task = asyncio.create_task(consume())
    await wait_until(lambda: engine.stats().running_requests == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: engine.stats().running_requests == 0 and engine.stats().kv_blocks_used == 0)
    fresh = await collect(engine, EngineRequest("fresh", (5, 6), greedy(3)))
    assert fresh[-1].finished


async def test_closing_the_iterator_aborts(make_async_engine) -> None:
    engine = make_async_engine()
    stream = engine.generate(EngineRequest("closed", (2, 3), greedy(200, ignore_eos=True)))
    await stream.__anext__()
    await stream.aclose()
    await wait_until(lambda: engine.stats().running_requests == 0 and engine.stats().kv_blocks_used == 0)


async def test_step_fault_fails_only_the_requests_in_that_step(make_async_engine) -> None:
    engine = make_async_engine(max_num_seqs=1)
    victim = engine.generate(EngineRequest("victim", (2, 3), greedy(100, ignore_eos=True)))
    await victim.__anext__()
    bystander_task = asyncio.create_task(collect(engine, EngineRequest("bystander", (4, 5), greedy(5))))
    await wait_until(lambda: engine.stats().waiting_requests == 1)
    calls = []

    def fail_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")

    engine.inject_step_fault(fail_once)
    with pytest.raises(RequestFailedError, match="RuntimeError"):
        async for _ in victim:
            pass
    bystander = await bystander_task
    assert bystander[-1].finished and bystander[-1].deltas[-1].finish_reason.value == "length"
    engine.inject_step_fault(None)
    await wait_until(lambda: engine.stats().running_requests == 0)
    assert engine.stats().alive and engine.stats().kv_blocks_used == 0


async def test_repeated_faults_kill_the_engine(make_async_engine) -> None:
    engine = make_async_engine(max_num_seqs=1)

    def always_fail() -> None:
        raise RuntimeError("broken")

    engine.inject_step_fault(always_fail)
    outcomes = await asyncio.gather(
        *(collect(engine, EngineRequest(f"doomed{i}", (2, 3), greedy(4))) for i in range(4)),
        return_exceptions=True,
    )
    assert all(isinstance(outcome, (RequestFailedError, EngineDeadError)) for outcome in outcomes)
    assert any(isinstance(outcome, EngineDeadError) for outcome in outcomes)
    assert not engine.stats().alive
    with pytest.raises(EngineDeadError):
        await collect(engine, EngineRequest("after", (2, 3), greedy(4)))


async def test_shutdown_aborts_in_flight_requests(make_async_engine) -> None:
    engine = make_async_engine()
    stream = engine.generate(EngineRequest("inflight", (2, 3), greedy(200, ignore_eos=True)))
    await stream.__anext__()
    await engine.shutdown()
    remaining = [output async for output in stream]
    assert remaining[-1].finished and remaining[-1].deltas[0].finish_reason.value == "abort"
    with pytest.raises(EngineDeadError):
        await collect(engine, EngineRequest("late", (2, 3), greedy(4)))


async def test_one_wake_up_per_loop_per_step_and_streams_on_other_loops(llama, make_async_engine) -> None:
    """A step's outputs reach their streams with one call_soon_threadsafe per event loop; streams
    served by another thread's loop get theirs, in order, too."""
    engine = make_async_engine()
    loop = asyncio.get_running_loop()
    scheduled: list[object] = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        scheduled.append(callback)
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    prompts = random_prompts(5, 3, 25, seed=22)
    here = [EngineRequest(f"h{i}", tuple(p), greedy(6)) for i, p in enumerate(prompts[:3])]
    elsewhere = [EngineRequest(f"e{i}", tuple(p), greedy(6)) for i, p in enumerate(prompts[3:])]

    def on_another_loop() -> list[list[RequestOutput]]:
        async def run() -> list[list[RequestOutput]]:
            return list(await asyncio.gather(*(collect(engine, request) for request in elsewhere)))

        return asyncio.run(run())

    try:
        other_streams, *local_streams = await asyncio.gather(
            asyncio.to_thread(on_another_loop), *(collect(engine, request) for request in here)
        )
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
    for prompt, outputs in zip(prompts, [*local_streams, *other_streams], strict=True):
        tokens = [token for output in outputs for delta in output.deltas for token in delta.token_ids]
        assert tokens == reference_greedy(llama, prompt, 6)
        assert outputs[-1].finished
    # Three streams here, six tokens each, one engine output per token: one wake-up per step that
    # touched them, not one per output (counted in tokens: a stream that lagged got merged outputs).
    tokens_here = sum(
        len(delta.token_ids) for outputs in local_streams for output in outputs for delta in output.deltas
    )
    assert tokens_here == 18 and len(scheduled) < tokens_here


async def test_a_caller_that_falls_behind_gets_the_queued_outputs_as_one(llama, make_async_engine) -> None:
    engine = make_async_engine()
    prompt = random_prompts(1, 4, 5, seed=23)[0]
    stream = engine.generate(EngineRequest("slow", tuple(prompt), greedy(12, ignore_eos=True)))
    first = await stream.__anext__()
    # The caller is busy while the engine finishes the request: eleven outputs wait in its queue.
    await wait_until(lambda: engine.stats().running_requests == 0)
    rest = [output async for output in stream]
    assert len(rest) == 1 and rest[0].finished and rest[0].usage is not None
    assert rest[0].deltas[0].finish_reason.value == "length"
    tokens = [token for output in (first, *rest) for delta in output.deltas for token in delta.token_ids]
    assert tokens == reference_greedy(llama, prompt, 12)


async def test_an_error_behind_queued_outputs_comes_after_them(llama, make_async_engine) -> None:
    engine = make_async_engine()
    prompt = random_prompts(1, 4, 5, seed=24)[0]
    stream = engine.generate(EngineRequest("doomed", tuple(prompt), greedy(100, ignore_eos=True)))
    first = await stream.__anext__()
    steps = engine.stats().steps
    await wait_until(lambda: engine.stats().steps >= steps + 4)
    engine.inject_step_fault(lambda: (_ for _ in ()).throw(RuntimeError("injected")))
    await wait_until(lambda: engine.stats().running_requests == 0)
    engine.inject_step_fault(None)
    merged = await stream.__anext__()
    with pytest.raises(RequestFailedError, match="RuntimeError"):
        await stream.__anext__()
    tokens = [token for output in (first, merged) for delta in output.deltas for token in delta.token_ids]
    assert len(tokens) >= 5 and not merged.finished
    assert tokens == reference_greedy(llama, prompt, len(tokens))
