"""`build_attention_group`'s index tensors and masks, against a direct per-query construction.

The group builds only the key slots and key lengths up front (all the decode kernel reads); the
SDPA path's query indices and masks are built on first use. Every one of them must equal what a
plain loop over sequences, queries and keys gives.
"""

from __future__ import annotations

import random

import pytest
import torch
from protoserve.server.engine.attention import build_attention_group

BLOCK_SIZE = 4


def _random_group(seed: int) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """Query starts, query lengths, context starts and block tables of a packed group: sequences
    of mixed lengths, each with its own non-overlapping blocks, some tables longer than needed."""
    rng = random.Random(seed)
    count = rng.randint(1, 6)
    query_lengths = [rng.choice([1, 1, rng.randint(1, 9)]) for _ in range(count)]
    context_starts = [rng.randint(0, 13) for _ in range(count)]
    query_starts, packed = [], rng.randint(0, 3)
    tables, next_block = [], 0
    for length, start in zip(query_lengths, context_starts, strict=True):
        query_starts.append(packed)
        packed += length
        blocks = -(-(start + length) // BLOCK_SIZE) + rng.randint(0, 1)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    return query_starts, query_lengths, context_starts, tables


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_group_tensors_match_a_direct_construction(seed: int, sliding_window: int | None) -> None:
    query_starts, query_lengths, context_starts, tables = _random_group(seed)
    group = build_attention_group(query_starts, query_lengths, context_starts, tables, BLOCK_SIZE, torch.device("cpu"))
    count = len(query_starts)
    max_queries = max(query_lengths)
    key_lengths = [start + length for start, length in zip(context_starts, query_lengths, strict=True)]
    max_keys = max(key_lengths)

    assert group.key_lengths.tolist() == key_lengths
    assert group.key_slots.shape == (count, max_keys) and group.key_slots.is_contiguous()
    assert group.query_index.shape == group.query_valid.shape == group.query_positions.shape == (count, max_queries)
    mask = group.mask_for_window(sliding_window)
    assert mask.shape == (count, 1, max_queries, max_keys)
    for s in range(count):
        for key in range(key_lengths[s]):
            expected_slot = tables[s][key // BLOCK_SIZE] * BLOCK_SIZE + key % BLOCK_SIZE
            assert group.key_slots[s, key].item() == expected_slot
        for i in range(max_queries):
            valid = i < query_lengths[s]
            position = context_starts[s] + i
            assert group.query_valid[s, i].item() == valid
            assert group.query_positions[s, i].item() == position
            assert group.query_index[s, i].item() == (query_starts[s] + i if valid else 0)
            for key in range(max_keys):
                allowed = key <= position and (sliding_window is None or key > position - sliding_window)
                if not valid and key == 0:
                    allowed = True  # a padded query row keeps one key: softmax never sees an empty row
                assert mask[s, 0, i, key].item() == allowed, (s, i, key)


def test_single_query_span_and_lazy_tensors() -> None:
    group = build_attention_group([2, 3, 4], [1, 1, 1], [5, 0, 9], [[0, 1], [2], [3, 4, 5]], BLOCK_SIZE,
                                  torch.device("cpu"))  # fmt: skip
    assert group.single_query_span == (2, 3)
    assert group.key_slots.tolist()[1][:1] == [8]
    assert group.mask is group.mask_for_window(None)  # built once per step, shared by every layer
    bias = group.bias_for_window(None, torch.float32)
    assert bias is group.bias_for_window(None, torch.float32)
    assert torch.equal(bias == 0, group.mask)
