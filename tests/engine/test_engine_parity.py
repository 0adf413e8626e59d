"""Greedy output through the engine equals plain `model.generate` for each request alone."""

from __future__ import annotations

import copy

import pytest
from protoserve.server.engine.api import EngineRequest
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
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


def assert_parity(engine_under_test, prompts, max_tokens, results, ids) -> None:
    for request_id, prompt in zip(ids, prompts, strict=True):
        expected = reference_greedy(engine_under_test.reference, prompt, max_tokens)
        assert results[request_id].token_ids[0] == expected, request_id


def test_one_request(llama) -> None:
    under_test = make_engine(llama)
    prompts = random_prompts(1, 12, 12)
    ids = submit(under_test.engine, prompts, greedy(12))
    results = run_until_done(under_test.engine)
    assert_parity(under_test, prompts, 12, results, ids)
    assert results[ids[0]].usage.prompt_tokens == 12
    assert results[ids[0]].usage.completion_tokens == 12


def test_sixteen_concurrent_mixed_lengths(llama) -> None:
    under_test = make_engine(llama)
    prompts = random_prompts(16, 1, 40, seed=1)
    ids = submit(under_test.engine, prompts, greedy(10))
    results = run_until_done(under_test.engine)
    assert_parity(under_test, prompts, 10, results, ids)


def test_small_token_budget_chunks_prefill(llama) -> None:
    under_test = make_engine(llama, max_num_batched_tokens=7, max_num_seqs=4)
    prompts = random_prompts(6, 10, 45, seed=2)
    ids = submit(under_test.engine, prompts, greedy(8))
    results = run_until_done(under_test.engine)
    assert_parity(under_test, prompts, 8, results, ids)


def test_prefix_cache_hits_keep_parity(llama) -> None:
    under_test = make_engine(llama)
    shared = random_prompts(1, 21, 21, seed=3)[0]
    tails = random_prompts(5, 1, 9, seed=4)
    prompts = [shared + tail for tail in tails]
    first = submit(under_test.engine, prompts[:1], greedy(6), prefix="first")
    results = run_until_done(under_test.engine)
    rest = submit(under_test.engine, prompts[1:], greedy(6), prefix="rest")
    results.update(run_until_done(under_test.engine))
    assert_parity(under_test, prompts, 6, results, first + rest)
    stats = under_test.engine.stats()
    assert stats.prefix_cache_hits >= 4 * 20  # 5 full blocks of 4 tokens each, for 4 requests
    assert all(results[request_id].usage.cached_tokens == 20 for request_id in rest)


def test_preemption_keeps_parity(llama) -> None:
    # 2 kB per block of 4 tokens: 14 blocks hold 56 tokens, far less than 8 requests need.
    under_test = make_engine(llama, kv_cache_bytes=14 * 2048, enable_prefix_caching=False)
    prompts = random_prompts(8, 5, 20, seed=5)
    ids = submit(under_test.engine, prompts, greedy(16))
    results = run_until_done(under_test.engine)
    assert under_test.engine.stats().preemptions > 0
    assert_parity(under_test, prompts, 16, results, ids)
    assert under_test.engine.stats().kv_blocks_used == 0


def test_n_choices_share_the_prompt_and_match(llama) -> None:
    under_test = make_engine(llama, max_num_batched_tokens=5)
    prompt = random_prompts(1, 13, 13, seed=6)[0]
    under_test.engine.add_request(EngineRequest("multi", tuple(prompt), greedy(7, n=3)))
    results = run_until_done(under_test.engine)
    expected = reference_greedy(under_test.reference, prompt, 7)
    assert [results["multi"].token_ids[index] for index in range(3)] == [expected] * 3
    assert results["multi"].usage.completion_tokens == 21
    assert under_test.engine.stats().kv_blocks_used == 0


def test_eos_stops_like_generate(llama) -> None:
    prompts = random_prompts(6, 3, 10, seed=7)
    # Make a token that the model does produce the end-of-sequence token, so that some requests stop on it.
    eos = reference_greedy(llama, prompts[0], 6)[3]
    model = copy.deepcopy(llama)
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    under_test = make_engine(model)
    ids = submit(under_test.engine, prompts, greedy(30))
    results = run_until_done(under_test.engine)
    stop_ids = (eos, EOS_TOKEN_ID)
    stopped = 0
    for request_id, prompt in zip(ids, prompts, strict=True):
        tokens = results[request_id].token_ids[0]
        assert tokens == reference_greedy(model, prompt, 30, stop_ids)
        expected_reason = "stop" if tokens[-1] in stop_ids else "length"
        assert results[request_id].finish_reasons[0] == expected_reason
        stopped += expected_reason == "stop"
    assert stopped >= 1


@pytest.mark.parametrize(
    ("config_class", "model_class"), [(Qwen2Config, Qwen2ForCausalLM), (MistralConfig, MistralForCausalLM)]
)
def test_other_llama_family_models(config_class, model_class) -> None:
    config = config_class(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=0,
    )
    under_test = make_engine(build_model(config, model_class))
    prompts = random_prompts(5, 2, 30, seed=8)
    ids = submit(under_test.engine, prompts, greedy(8))
    results = run_until_done(under_test.engine)
    assert_parity(under_test, prompts, 8, results, ids)


def test_sliding_window_attention() -> None:
    config = MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=6,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=0,
    )
    under_test = make_engine(build_model(config, MistralForCausalLM), max_num_batched_tokens=9)
    prompts = random_prompts(4, 10, 30, seed=9)
    ids = submit(under_test.engine, prompts, greedy(10))
    results = run_until_done(under_test.engine)
    assert_parity(under_test, prompts, 10, results, ids)


def test_softcapping_and_per_layer_windows() -> None:
    config = Gemma2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=5,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=30.0,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=0,
        attn_implementation="eager",
    )
    under_test = make_engine(build_model(config, Gemma2ForCausalLM), max_num_batched_tokens=9)
    prompts = random_prompts(4, 8, 25, seed=10)
    ids = submit(under_test.engine, prompts, greedy(8))
    results = run_until_done(under_test.engine)
    assert_parity(under_test, prompts, 8, results, ids)


def test_n_choices_with_few_sequence_slots_and_a_tiny_cache(llama) -> None:
    # 3 choices but 2 sequence slots: a forked choice waits a step with its copied partial block.
    under_test = make_engine(llama, max_num_seqs=2, kv_cache_bytes=12 * 2048)
    prompts = random_prompts(2, 9, 15, seed=16)
    for index, prompt in enumerate(prompts):
        under_test.engine.add_request(EngineRequest(f"m{index}", tuple(prompt), greedy(9, n=3)))
    results = run_until_done(under_test.engine)
    for index, prompt in enumerate(prompts):
        expected = reference_greedy(under_test.reference, prompt, 9)
        assert [results[f"m{index}"].token_ids[choice] for choice in range(3)] == [expected] * 3
    assert under_test.engine.stats().kv_blocks_used == 0
