"""Fixed-size KV blocks: free list, reference counts and the prefix cache.

A block holds `block_size` consecutive tokens of one or more sequences (shared prefixes). Once a
block is full its content is identified by a chained hash: the parent block's hash, its token ids
and an extra key (image content hashes for blocks holding image tokens). A new sequence whose
prompt starts with the same full blocks reuses them instead of recomputing; a hit re-checks the
token ids, and the block holding the prompt's last token is never taken from the cache, so the
runner always computes at least one token and has logits to sample from.

Invariants: a block is either referenced (`ref_count > 0`), or free. Free blocks are split in
`free_uncached` (no content worth keeping, handed out first) and `evictable` (hashed content, kept
in least-recently-freed order and evicted from the front when the uncached ones run out).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from protoserve.server.engine.sequence import Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    content_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chained_block_hash(parent_hash: int | None, token_ids: tuple[int, ...], extra_key: tuple[str, ...]) -> int:
    """The prefix hash of a full block: collisions are harmless because hits re-check the tokens."""
    return hash((parent_hash, token_ids, extra_key))


class BlockManager:
    """Hands out KV blocks to sequences and keeps the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        self.free_uncached: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (never-used or cached-but-unreferenced)."""
        return len(self.free_uncached) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- prefix cache lookup -----

    def _find_cached_prefix(self, sequence: Sequence) -> list[tuple[int, int]]:
        """Blocks of the sequence's leading full blocks found in the cache, as (block_id, hash).
        Stops at the first miss; never covers the sequence's last token."""
        if not self.enable_prefix_caching:
            return []
        found: list[tuple[int, int]] = []
        parent_hash: int | None = None
        num_candidate_blocks = (sequence.num_tokens - 1) // self.block_size
        for index in range(num_candidate_blocks):
            start, end = index * self.block_size, (index + 1) * self.block_size
            tokens = tuple(sequence.token_ids[start:end])
            content_hash = chained_block_hash(parent_hash, tokens, sequence.hash_extra_key(start, end))
            block_id = self.hash_to_block.get(content_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append((block_id, content_hash))
            parent_hash = content_hash
        return found

    # ----- allocation -----

    def allocate_first(self, sequence: Sequence, num_new_tokens: int) -> int | None:
        """Give a sequence with no blocks its cached prefix plus room for `num_new_tokens` more.

        Returns how many tokens came from the cache (0 when none), or None when there are not
        enough free blocks (nothing changes then). `num_new_tokens` counts tokens after the
        cached prefix and is clipped by the caller against what remains."""
        if sequence.block_table:
            raise RuntimeError(f"sequence {sequence.sequence_id} already holds blocks")
        cached = self._find_cached_prefix(sequence)
        num_cached_tokens = len(cached) * self.block_size
        num_new_tokens = min(num_new_tokens, sequence.num_tokens - num_cached_tokens)
        revived = sum(1 for block_id, _ in cached if self.blocks[block_id].ref_count == 0)
        fresh = self.blocks_needed(num_cached_tokens + num_new_tokens) - len(cached)
        if revived + fresh > self.num_free_blocks:
            return None
        for block_id, content_hash in cached:
            self._take_reference(block_id)
            sequence.block_table.append(block_id)
            sequence.block_hashes.append(content_hash)
        for _ in range(fresh):
            sequence.block_table.append(self._pop_free_block())
        if self.enable_prefix_caching:
            self.prefix_cache_queries += sequence.num_tokens
            self.prefix_cache_hits += num_cached_tokens
        return num_cached_tokens

    def can_append(self, sequence: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(sequence.num_computed_tokens + num_new_tokens) - len(sequence.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, sequence: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more computed tokens. False when out of blocks."""
        needed = self.blocks_needed(sequence.num_computed_tokens + num_new_tokens) - len(sequence.block_table)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            sequence.block_table.append(self._pop_free_block())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]] | None:
        """Let `child` share `parent`'s computed blocks. Full blocks are shared by reference; a
        partly filled last block is copied (the child writes its own tokens there). Returns the
        (source, destination) block copies the runner must make before the next forward, or None
        when no block is free for the copy (nothing changes then)."""
        num_full = parent.num_computed_tokens // self.block_size
        has_partial = parent.num_computed_tokens % self.block_size != 0
        if has_partial and self.num_free_blocks < 1:
            return None
        for block_id in parent.block_table[:num_full]:
            self._take_reference(block_id)
        child.block_table = list(parent.block_table[:num_full])
        child.block_hashes = list(parent.block_hashes[:num_full])
        copies: list[tuple[int, int]] = []
        if has_partial:
            destination = self._pop_free_block()
            child.block_table.append(destination)
            copies.append((parent.block_table[num_full], destination))
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        return copies

    def cache_full_blocks(self, sequence: Sequence) -> None:
        """Hash and register the sequence's blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = sequence.num_computed_tokens // self.block_size
        for index in range(len(sequence.block_hashes), num_full):
            start, end = index * self.block_size, (index + 1) * self.block_size
            tokens = tuple(sequence.token_ids[start:end])
            parent_hash = sequence.block_hashes[-1] if sequence.block_hashes else None
            content_hash = chained_block_hash(parent_hash, tokens, sequence.hash_extra_key(start, end))
            sequence.block_hashes.append(content_hash)
            block = self.blocks[sequence.block_table[index]]
            if block.content_hash is None and content_hash not in self.hash_to_block:
                block.content_hash = content_hash
                block.token_ids = tokens
                self.hash_to_block[content_hash] = block.block_id

    def free(self, sequence: Sequence) -> None:
        """Drop the sequence's references; blocks nobody holds become free (hashed ones evictable).
        Tail blocks are released first so that they are evicted before the prefix they extend."""
        for block_id in reversed(sequence.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than taken")
            if block.ref_count == 0:
                if block.content_hash is None:
                    self.free_uncached.append(block_id)
                else:
                    self.evictable[block_id] = None
        sequence.block_table = []
        sequence.block_hashes = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (they stay free)."""
        for block_id in list(self.evictable):
            self._forget_hash(self.blocks[block_id])
            self.free_uncached.append(block_id)
        self.evictable.clear()
        for block in self.blocks:
            self._forget_hash(block)

    # ----- internals -----

    def _take_reference(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def _pop_free_block(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            self._forget_hash(self.blocks[block_id])
        block = self.blocks[block_id]
        block.ref_count = 1
        return block_id

    def _forget_hash(self, block: Block) -> None:
        if block.content_hash is not None and self.hash_to_block.get(block.content_hash) == block.block_id:
            del self.hash_to_block[block.content_hash]
        block.content_hash = None
        block.token_ids = ()
