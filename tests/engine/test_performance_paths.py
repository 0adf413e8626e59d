"""The engine's fast paths give the same results as the general ones, and the KV cache keeps its bound.

Fast paths: small-batch linears run as W @ x^T; decodes read and write their queries as a slice
instead of a gather and a scatter; rows blocked only by min_tokens / ignore_eos are masked in
place, without full-vocabulary masks.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from protoserve.server.engine.api import EngineRequest, SamplingParams
from protoserve.server.engine.attention import PagedAttentionMetadata, build_attention_group, paged_attention_forward
from protoserve.server.engine.cpu_linear import small_batch_linear, use_row_split_linears
from protoserve.server.engine.sampler import Sampler, SamplingRow

from .engine_fixtures import build_model, greedy, make_engine, run_until_done, tiny_llama_config

BLOCK_SIZE = 4
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8


class _Layer(torch.nn.Module):
    layer_idx = 0


def _attend(group_tables: list[list[int]], context_lengths: list[int], query_starts: list[int], fast: bool):
    generator = torch.Generator().manual_seed(0)
    num_slots = 8 * BLOCK_SIZE
    key_cache = torch.randn(num_slots, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    value_cache = torch.randn(num_slots, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    num_tokens = max(query_starts) + 1
    group = build_attention_group(
        query_starts=query_starts,
        query_lengths=[1] * len(query_starts),
        context_starts=context_lengths,
        block_tables=group_tables,
        block_size=BLOCK_SIZE,
        device=torch.device("cpu"),
    )
    if not fast:
        group = dataclasses.replace(group, single_query_span=None)
    slots = [table[length // BLOCK_SIZE] * BLOCK_SIZE + length % BLOCK_SIZE
             for table, length in zip(group_tables, context_lengths, strict=True)]  # fmt: skip
    slot_mapping = torch.zeros(num_tokens, dtype=torch.long)
    slot_mapping[torch.tensor(query_starts)] = torch.tensor(slots)
    metadata = PagedAttentionMetadata(slot_mapping, [group], [key_cache], [value_cache])
    query = torch.randn(1, NUM_HEADS, num_tokens, HEAD_DIM, generator=generator)
    key = torch.randn(1, NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=generator)
    value = torch.randn(1, NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=generator)
    output, _ = paged_attention_forward(_Layer(), query, key, value, None, paged_metadata=metadata)
    return group, output[0, query_starts], key_cache


def test_decode_span_matches_the_gathered_path() -> None:
    tables, lengths = [[0, 1], [2], [3, 4, 5]], [5, 2, 9]
    fast_group, fast, fast_cache = _attend(tables, lengths, [0, 1, 2], fast=True)
    slow_group, slow, slow_cache = _attend(tables, lengths, [0, 1, 2], fast=False)
    assert fast_group.single_query_span == (0, 3) and slow_group.single_query_span is None
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast_cache, slow_cache)


def test_span_only_for_one_query_each_at_consecutive_positions() -> None:
    def span(query_starts: list[int], query_lengths: list[int]) -> tuple[int, int] | None:
        return build_attention_group(
            query_starts, query_lengths, [0] * len(query_starts), [[0]] * len(query_starts), 4, torch.device("cpu")
        ).single_query_span

    assert span([3, 4, 5], [1, 1, 1]) == (3, 3)
    assert span([0, 2], [1, 1]) is None  # a gap: the gather path
    assert span([0, 2], [2, 1]) is None  # a prefill chunk


def test_blocked_row_left_with_nothing_falls_back_like_the_masked_path() -> None:
    vocabulary, eos = 4, 3
    logits = torch.tensor([[-math.inf, -math.inf, -math.inf, 1.0], [0.5, -math.inf, -math.inf, 2.0]])
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, min_tokens=3), None, [1], [], None, frozenset({eos})),
        SamplingRow(SamplingParams(temperature=0.0, ignore_eos=True), None, [1], [], None, frozenset({eos})),
    ]
    result = Sampler(vocab_size=vocabulary).sample(logits, rows)
    # Row 0: only EOS has mass, so blocking it leaves nothing: EOS comes back. Row 1: EOS is blocked.
    assert result.token_ids == [eos, 0]
    assert logits[0, eos] == 1.0, "the caller's logits are not modified"


def test_kv_cache_tensors_stay_within_the_configured_bytes() -> None:
    limit = 96 * 1024
    under_test = make_engine(build_model(tiny_llama_config()), kv_cache_bytes=limit)
    runner = under_test.engine.runner
    caches = [*runner.key_caches, *runner.value_caches]
    allocated = sum(cache.nbytes for cache in caches)
    block_bytes = runner.shape.bytes_per_token * BLOCK_SIZE
    assert limit - block_bytes < allocated <= limit
    for index in range(12):
        under_test.engine.add_request(EngineRequest(f"r{index}", (2, 3, 4, 5, 6), greedy(20)))
    run_until_done(under_test.engine)
    assert [cache.data_ptr() for cache in [*runner.key_caches, *runner.value_caches]] == [
        cache.data_ptr() for cache in caches
    ], "the cache is allocated once and never grows"
    assert sum(cache.nbytes for cache in [*runner.key_caches, *runner.value_caches]) == allocated


def test_kv_cache_too_small_for_one_block_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="holds no block"):
        make_engine(build_model(tiny_llama_config()), kv_cache_bytes=16)


@pytest.mark.parametrize("rows", [1, 2, 8, 32, 64, 128, 200])
@pytest.mark.parametrize("bias", [True, False])
def test_row_split_linear_equals_the_usual_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    layer = torch.nn.Linear(24, 40, bias=bias)
    hidden = torch.randn(1, rows, 24)
    expected = layer(hidden)
    assert use_row_split_linears(layer) == 1
    result = layer(hidden)
    assert result.shape == expected.shape and result.is_contiguous()
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("rows", "outputs"), [(1, 40), (1, 9000), (32, 9000), (64, 9000), (100, 40)])
def test_small_batch_linear_equals_f_linear_for_every_shape_and_thread_count(
    threads: int, rows: int, outputs: int
) -> None:
    torch.manual_seed(rows + outputs)
    weight, bias, hidden = torch.randn(outputs, 24), torch.randn(outputs), torch.randn(rows, 24)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        result = small_batch_linear(hidden, weight, bias)
    finally:
        torch.set_num_threads(before)
    expected = torch.nn.functional.linear(hidden, weight, bias)
    assert result.shape == (rows, outputs) and result.is_contiguous()
    torch.testing.assert_close(result, expected)
    view = small_batch_linear(hidden, weight, bias, contiguous=False)  # may be a transposed view
    torch.testing.assert_close(view, expected)


def test_row_split_linears_switch_only_plain_float32_cpu_layers() -> None:
    model = build_model(tiny_llama_config())
    plain = sum(type(module) is torch.nn.Linear for module in model.modules())
    assert use_row_split_linears(model) == plain > 0
    assert use_row_split_linears(build_model(tiny_llama_config()).to(torch.bfloat16)) == 0
