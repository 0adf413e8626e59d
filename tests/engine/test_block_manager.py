"""Block manager: reference counts, chained prefix hashes, the last-token rule, eviction, forks."""

from __future__ import annotations

import pytest
from protoserve.server.engine.api import EngineRequest, MultimodalInputs
from protoserve.server.engine.block_manager import BlockManager
from protoserve.server.engine.sequence import RequestState, Sequence

IMAGE = 99


def sequence(tokens: list[int], image_hashes: tuple[str, ...] | None = None) -> Sequence:
    multimodal = MultimodalInputs({}, image_hashes) if image_hashes is not None else None
    request = EngineRequest(f"req-{id(tokens)}", tuple(tokens), multimodal=multimodal)
    return RequestState.create(request, 0, 1000, IMAGE).sequences[0]


def computed(manager: BlockManager, tokens: list[int], image_hashes: tuple[str, ...] | None = None) -> Sequence:
    """A sequence admitted, fully computed, and registered in the prefix cache."""
    seq = sequence(tokens, image_hashes)
    cached = manager.allocate_first(seq, len(tokens))
    assert cached is not None
    seq.num_computed_tokens = len(tokens)
    manager.cache_full_blocks(seq)
    return seq


def test_refuses_nonsense_sizes() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, 4)


def test_shared_prefix_is_reused_and_counted() -> None:
    manager = BlockManager(10, 4)
    first = computed(manager, list(range(10)))  # 2 full blocks + 2 tokens
    second = sequence(list(range(8)) + [50, 51, 52])
    assert manager.allocate_first(second, 100) == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert manager.blocks[first.block_table[0]].ref_count == 2
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (21, 8)


def test_last_prompt_token_is_never_cached() -> None:
    manager = BlockManager(10, 4)
    computed(manager, list(range(8)))
    same = sequence(list(range(8)))
    assert manager.allocate_first(same, 100) == 4  # the second block holds the last token


def test_hash_chain_and_token_recheck() -> None:
    manager = BlockManager(10, 4)
    computed(manager, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    different_first_block = sequence([0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.allocate_first(different_first_block, 100) == 0  # same second block, other parent
    # A forged hash collision: the hit must re-check the tokens.
    block = manager.blocks[manager.hash_to_block[next(iter(manager.hash_to_block))]]
    block.token_ids = (7, 7, 7, 7)
    assert manager.allocate_first(sequence([1, 2, 3, 4, 5, 6, 7, 8, 9]), 100) == 0


def test_image_blocks_match_only_the_same_image() -> None:
    manager = BlockManager(20, 4)
    tokens = [1, 2, 3, 4, IMAGE, IMAGE, IMAGE, IMAGE, 5, 6, 7, 8, 9]
    computed(manager, tokens, ("cat",))
    assert manager.allocate_first(sequence(tokens, ("dog",)), 100) == 4
    assert manager.allocate_first(sequence(tokens, ("cat",)), 100) == 12


def test_free_keeps_cached_blocks_evictable_in_lru_order() -> None:
    manager = BlockManager(4, 2)
    old = computed(manager, [1, 2, 3, 4, 5])  # 3 blocks, 2 hashed
    manager.free(old)
    assert manager.num_free_blocks == 4 and manager.num_used_blocks == 0
    assert len(manager.hash_to_block) == 2
    filler = sequence([9, 9, 9, 9, 9, 9, 9])  # needs all 4 blocks: evicts both cached ones
    assert manager.allocate_first(filler, 7) == 0
    assert manager.hash_to_block == {}
    assert manager.allocate_first(sequence([1, 2]), 2) is None  # nothing left; nothing changed
    manager.free(filler)
    assert manager.num_free_blocks == 4


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    manager = BlockManager(10, 4)
    parent = computed(manager, list(range(6)))
    child = sequence(list(range(6)))
    copies = manager.fork(parent, child)
    assert child.block_table[0] == parent.block_table[0]
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert manager.blocks[parent.block_table[0]].ref_count == 2
    manager.free(parent)
    manager.free(child)
    assert manager.num_used_blocks == 0
    with pytest.raises(RuntimeError, match="freed more often"):
        manager.blocks[0].ref_count = 0
        manager.free(type(child)(child.request, 0, [1], 1, block_table=[0]))


def test_reset_prefix_cache_forgets_everything() -> None:
    manager = BlockManager(6, 2)
    manager.free(computed(manager, [1, 2, 3, 4, 5]))
    manager.reset_prefix_cache()
    assert manager.hash_to_block == {} and manager.num_free_blocks == 6
    assert manager.allocate_first(sequence([1, 2, 3, 4, 5]), 5) == 0
