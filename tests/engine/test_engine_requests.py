"""Request handling of the synchronous engine: validation, limits, aborts, seeds, isolation, accounting."""

from __future__ import annotations

import pytest
import torch
from protoserve.server.engine.api import EngineRequest, MultimodalInputs, SamplingParams
from protoserve.server.engine.errors import (
    EngineOverloadedError,
    InvalidRequestError,
    KVCacheExhaustedError,
    PromptTooLongError,
)

from .engine_fixtures import (
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    build_model,
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    run_until_done,
    submit,
    tiny_llama_config,
)


@pytest.fixture(scope="module")
def llama():
    return build_model(tiny_llama_config())


def test_prompt_too_long_names_both_numbers(llama) -> None:
    engine = make_engine(llama).engine  # context length 256
    with pytest.raises(PromptTooLongError, match="context length is 256") as raised:
        engine.add_request(EngineRequest("long", tuple(range(2, 202)), greedy(100)))
    assert raised.value.prompt_tokens == 200 and raised.value.max_tokens == 100
    with pytest.raises(PromptTooLongError):
        engine.add_request(EngineRequest("full", tuple([5] * 256), SamplingParams()))
    assert not engine.has_unfinished_requests


def test_configured_max_model_len_caps_the_context(llama) -> None:
    engine = make_engine(llama, max_model_len=32).engine
    assert engine.context_length == 32
    with pytest.raises(PromptTooLongError, match="context length is 32"):
        engine.add_request(EngineRequest("over", tuple(range(2, 30)), greedy(5)))
    engine.add_request(EngineRequest("open", tuple(range(2, 30)), SamplingParams(temperature=0.0, ignore_eos=True)))
    results = run_until_done(engine)
    assert len(results["open"].token_ids[0]) == 32 - 28 and results["open"].finish_reasons == {0: "length"}


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ((), greedy(4), "empty"),
        ((1, 2), greedy(4, n=0), "n must be"),
        ((1, 2), greedy(4, n=9), "n must be"),
        ((1, VOCAB_SIZE), greedy(4), "outside the vocabulary"),
        ((1, -3), greedy(4), "outside the vocabulary"),
        ((1, 2), greedy(0), "max_tokens"),
        ((1, 2), greedy(4, stop_token_ids=(VOCAB_SIZE + 5,)), "stop_token_ids"),
    ],
)
def test_bad_requests_are_refused(llama, prompt, params, message) -> None:
    engine = make_engine(llama).engine
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(EngineRequest("bad", prompt, params))
    assert engine.stats().waiting_requests == 0


def test_duplicate_id_and_images_on_text_model_are_refused(llama) -> None:
    engine = make_engine(llama).engine
    engine.add_request(EngineRequest("same", (3, 4), greedy(2)))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(EngineRequest("same", (3, 4), greedy(2)))
    image = MultimodalInputs({"pixel_values": torch.zeros(1, 3, 8, 8)}, ("abc",))
    with pytest.raises(InvalidRequestError, match="does not accept images"):
        engine.add_request(EngineRequest("image", (3, 4), greedy(2), multimodal=image))


def test_waiting_queue_is_bounded(llama) -> None:
    engine = make_engine(llama, max_waiting_requests=3).engine
    submit(engine, random_prompts(3, 4, 4), greedy(2))
    with pytest.raises(EngineOverloadedError, match="3 requests waiting"):
        engine.add_request(EngineRequest("excess", (5, 6), greedy(2)))
    run_until_done(engine)
    engine.add_request(EngineRequest("later", (5, 6), greedy(2)))  # room again


def test_request_larger_than_the_cache_is_refused(llama) -> None:
    engine = make_engine(llama, kv_cache_bytes=4 * 2048).engine  # 4 blocks of 4 tokens
    with pytest.raises(KVCacheExhaustedError, match="holds only 16"):
        engine.add_request(EngineRequest("huge", tuple(range(2, 20)), greedy(2)))
    with pytest.raises(KVCacheExhaustedError):
        engine.add_request(EngineRequest("long-output", (2, 3), greedy(40)))


def test_sequence_alone_out_of_cache_ends_with_length(llama) -> None:
    engine = make_engine(llama, kv_cache_bytes=4 * 2048).engine
    engine.add_request(EngineRequest("open-ended", (2, 3, 4), SamplingParams(temperature=0.0, ignore_eos=True)))
    results = run_until_done(engine)
    assert results["open-ended"].finish_reasons == {0: "length"}
    # 16 slots hold the prompt and 13 outputs; the 14th output was sampled but needs no slot yet.
    assert len(results["open-ended"].token_ids[0]) == 16 - 3 + 1
    assert engine.stats().kv_blocks_used == 0


def test_abort_waiting_and_running(llama) -> None:
    engine = make_engine(llama, max_num_seqs=1).engine
    submit(engine, random_prompts(2, 6, 6), greedy(20))
    engine.step()
    engine.step()
    stats = engine.stats()
    assert (stats.running_requests, stats.waiting_requests) == (1, 1)
    waiting_final = engine.abort("r1")
    assert waiting_final is not None and waiting_final.finished
    assert waiting_final.deltas[0].finish_reason.value == "abort"
    assert waiting_final.usage.completion_tokens == 0
    running_final = engine.abort("r0")
    assert running_final.deltas[0].finish_reason.value == "abort"
    assert running_final.usage.completion_tokens == 2
    assert engine.abort("r0") is None
    assert not engine.has_unfinished_requests
    assert engine.stats().kv_blocks_used == 0
    assert engine.step() == []


def test_priority_runs_first(llama) -> None:
    engine = make_engine(llama, max_num_seqs=1).engine
    engine.add_request(EngineRequest("low", (2, 3), greedy(3), priority=0))
    engine.add_request(EngineRequest("high", (4, 5), greedy(3), priority=5))
    finished_order = []
    while engine.has_unfinished_requests:
        finished_order += [output.request_id for output in engine.step() if output.finished]
    assert finished_order == ["high", "low"]


def test_seeded_sampling_does_not_depend_on_the_batch(llama) -> None:
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, n=2)
    prompt = random_prompts(1, 9, 9, seed=11)[0]

    alone = make_engine(llama).engine
    alone.add_request(EngineRequest("seeded", tuple(prompt), params))
    alone_result = run_until_done(alone)["seeded"]

    crowded = make_engine(llama, max_num_batched_tokens=6).engine
    submit(crowded, random_prompts(5, 3, 20, seed=12), SamplingParams(temperature=1.0, max_tokens=12), prefix="noise")
    crowded.add_request(EngineRequest("seeded", tuple(prompt), params))
    crowded_result = run_until_done(crowded)["seeded"]

    assert alone_result.token_ids == crowded_result.token_ids
    assert alone_result.token_ids[0] != alone_result.token_ids[1]  # choices get different seeds


def test_no_request_sees_another_ones_tokens(llama) -> None:
    # Without prefix caching every block goes back to the free list and is reused by the next wave.
    under_test = make_engine(llama, kv_cache_bytes=24 * 2048, enable_prefix_caching=False)
    engine = under_test.engine
    first_wave = random_prompts(4, 10, 20, seed=13)
    submit(engine, first_wave, greedy(12), prefix="first")
    run_until_done(engine)
    second_wave = random_prompts(4, 3, 15, seed=14)
    ids = submit(engine, second_wave, greedy(12), prefix="second")
    results = run_until_done(engine)
    for request_id, prompt in zip(ids, second_wave, strict=True):
        assert results[request_id].token_ids[0] == reference_greedy(under_test.reference, prompt, 12)


def test_every_block_is_free_after_finish_and_abort(llama) -> None:
    engine = make_engine(llama, kv_cache_bytes=30 * 2048).engine
    submit(engine, random_prompts(6, 3, 30, seed=15), greedy(9, n=2))
    for _ in range(4):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    engine.abort("r2")
    engine.abort("r5")
    run_until_done(engine)
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running_requests == 0 and stats.waiting_requests == 0
    block_manager = engine.scheduler.block_manager
    assert all(block.ref_count == 0 for block in block_manager.blocks)


def test_logprobs_and_text_reach_the_deltas(llama) -> None:
    engine = make_engine(llama).engine
    engine.add_request(EngineRequest("lp", (3, 4, 5), greedy(5, logprobs=True, top_logprobs=2)))
    engine.add_request(EngineRequest("plain", (3, 4, 5), greedy(5)))
    outputs = []
    while engine.has_unfinished_requests:
        outputs += [output for output in engine.step() if output.request_id == "lp"]
    deltas = [delta for output in outputs for delta in output.deltas]
    token_ids = [token for delta in deltas for token in delta.token_ids]
    logprobs = [logprob for delta in deltas for logprob in delta.logprobs]
    assert [logprob.token_id for logprob in logprobs] == token_ids
    assert all(len(logprob.top) == 2 and logprob.logprob <= 0.0 for logprob in logprobs)
    assert "".join(delta.text for delta in deltas).split() == [f"w{token}" for token in token_ids]


class OnlyTokens:
    """A constraint allowing a fixed set of tokens, complete after `length` of them."""

    def __init__(self, allowed: set[int], length: int) -> None:
        self.allowed, self.length, self.accepted = allowed, length, []

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor | None:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[list(self.allowed)] = True
        if self.is_complete():
            mask[EOS_TOKEN_ID] = True
        return mask

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)

    def is_complete(self) -> bool:
        return len(self.accepted) >= self.length


def test_each_choice_gets_its_own_constraint(llama) -> None:
    made: list[OnlyTokens] = []

    def factory() -> OnlyTokens:
        made.append(OnlyTokens({7, 8}, length=50))
        return made[-1]

    engine = make_engine(llama).engine
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=6, n=2, constraint_factory=factory)
    engine.add_request(EngineRequest("constrained", (3, 4, 5), params))
    result = run_until_done(engine)["constrained"]
    assert len(made) == 2
    for index in range(2):
        assert set(result.token_ids[index]) <= {7, 8} and len(result.token_ids[index]) == 6
        assert made[index].accepted == result.token_ids[index]
