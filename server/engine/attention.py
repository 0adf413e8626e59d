"""Paged attention as a transformers attention function.

The model runs with `config._attn_implementation = "protoserve_paged"`. Every step packs all
scheduled tokens into one row (batch 1, sequence length = number of tokens, explicit
`position_ids`), and passes a `PagedAttentionMetadata` as the keyword `paged_metadata`, which
transformers forwards through the model's `**kwargs` to `paged_attention_forward` in each layer.

The function writes the step's new keys and values into the layer's paged cache (the slots of
`slot_mapping`), then, per group of sequences, gathers each sequence's keys and values from its
blocks, pads them to the group's longest context and runs one masked SDPA call for the group:
one group for decodes (one query each) and one for prefill chunks. The mask is causal within the
chunk and covers all earlier cached tokens; sliding windows and GQA are handled, soft-capping
falls back to an explicit softmax.

Per-step cost matters on CPUs (this runs 2 x layers times a step): cache writes use `index_copy_`,
gathers use `index_select` on flat slot lists, and a group whose queries are one token each at
consecutive packed positions (the decodes, packed first) reads and writes its queries as a slice,
without a gather or a scatter. When the runner passes a `decode_attention` kernel (cpu_kernels.py),
that group skips the gathers and SDPA altogether: the kernel reads the keys and values in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "protoserve_paged"


@dataclass
class AttentionGroup:
    """Sequences attended together: by the decode kernel, or with one padded SDPA call.

    Sequence s has `query_lengths[s]` queries at packed positions `query_starts[s] + i`, token
    positions `context_starts[s] + i`; `key_slots[s, j]` is the cache slot of its key j and
    `key_lengths[s]` how many keys it has. Only these two are built with the group: the kernel
    needs nothing else. The SDPA path's query indices and masks are built on first use
    (`query_index`, `query_valid`, `query_positions`, `mask`), once per step, on the group's device.
    """

    key_slots: torch.Tensor  # [S, K] long
    key_lengths: torch.Tensor  # [S] long
    query_starts: list[int]
    query_lengths: list[int]
    context_starts: list[int]
    # (first packed position, S) when every query is one token and they are packed consecutively.
    single_query_span: tuple[int, int] | None = None
    _query_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)
    _biases: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def _queries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._query_tensors is None:
            device = self.key_slots.device
            offsets = torch.arange(max(self.query_lengths), device=device)
            lengths = torch.tensor(self.query_lengths, device=device)
            valid = offsets[None, :] < lengths[:, None]
            starts = torch.tensor(self.query_starts, device=device)
            index = torch.where(valid, starts[:, None] + offsets[None, :], 0)
            positions = torch.tensor(self.context_starts, device=device)[:, None] + offsets[None, :]
            self._query_tensors = (index, valid, positions)
        return self._query_tensors

    @property
    def query_index(self) -> torch.Tensor:
        """[S, Q] long: packed position of query i of sequence s (0 where `query_valid` is False)."""
        return self._queries()[0]

    @property
    def query_valid(self) -> torch.Tensor:
        """[S, Q] bool: which entries of `query_index` are real queries."""
        return self._queries()[1]

    @property
    def query_positions(self) -> torch.Tensor:
        """[S, Q] long: token position of query i of sequence s."""
        return self._queries()[2]

    @property
    def mask(self) -> torch.Tensor:
        """[S, 1, Q, K] bool, True where attention is allowed: causal over the cached and new keys.
        Padded query rows keep key 0, so that softmax never sees an empty row."""
        return self.mask_for_window(None)

    def mask_for_window(self, sliding_window: int | None) -> torch.Tensor:
        """The boolean mask, narrowed to the last `sliding_window` keys of each query when given."""
        cached = self._masks.get(sliding_window)
        if cached is None:
            key_positions = torch.arange(self.key_slots.shape[1], device=self.key_slots.device)
            query_positions = self.query_positions[:, :, None]
            cached = key_positions[None, None, :] <= query_positions
            if sliding_window is not None:
                cached &= key_positions[None, None, :] > query_positions - sliding_window
            cached[:, :, 0] |= ~self.query_valid
            cached = cached[:, None, :, :]
            self._masks[sliding_window] = cached
        return cached

    def bias_for_window(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The same mask as an additive bias (0 or -inf), built once per step and reused by every layer."""
        key = (sliding_window, dtype)
        cached = self._biases.get(key)
        if cached is None:
            mask = self.mask_for_window(sliding_window)
            cached = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._biases[key] = cached
        return cached


# (query [S, H, D], key cache, value cache, key_slots [S, K], key_lengths [S], scale, sliding window)
# -> [S, H, D]: one query per sequence against its cached keys (cpu_kernels.CpuKernels).
DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int | None], torch.Tensor
]


@dataclass
class PagedAttentionMetadata:
    """What one step's attention needs besides q, k, v. Built once per step by the runner."""

    slot_mapping: torch.Tensor  # [T] long: cache slot of each packed token
    groups: list[AttentionGroup]
    key_caches: list[torch.Tensor]  # per layer [num_slots, kv_heads, head_dim]
    value_caches: list[torch.Tensor]
    # Attention for groups of one-token queries that reads the cache in place; None: gather + SDPA.
    decode_attention: DecodeAttention | None = None


def build_attention_group(
    query_starts: list[int],
    query_lengths: list[int],
    context_starts: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionGroup:
    """Index tensors for a group of sequences.

    For sequence s: its queries sit at packed positions `query_starts[s] + i` for
    i < `query_lengths[s]`, at token positions `context_starts[s] + i`; `block_tables[s]` lists
    the KV blocks of its tokens, so token position p lives in slot
    `block_tables[s][p // block_size] * block_size + p % block_size`.
    """
    num_sequences = len(query_starts)
    key_lengths = [start + length for start, length in zip(context_starts, query_lengths, strict=True)]
    max_keys = max(key_lengths)
    max_blocks = max(len(table) for table in block_tables)
    # Block tables padded with block 0 (keys past a sequence's length point there; the mask or
    # the key length hides them), expanded to one slot per key position.
    padded_tables = torch.tensor([table + [0] * (max_blocks - len(table)) for table in block_tables])
    slots = padded_tables[:, :, None] * block_size + torch.arange(block_size)
    key_slots = slots.view(num_sequences, max_blocks * block_size)[:, :max_keys].contiguous()
    first = query_starts[0]
    consecutive = max(query_lengths) == 1 and query_starts == list(range(first, first + num_sequences))
    return AttentionGroup(
        key_slots=key_slots.to(device),
        key_lengths=torch.tensor(key_lengths).to(device),
        query_starts=list(query_starts),
        query_lengths=list(query_lengths),
        context_starts=list(context_starts),
        single_query_span=(first, num_sequences) if consecutive else None,
    )


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group: AttentionGroup,
    sliding_window: int | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """query [S, H, Q, D], key/value [S, KV, K, D] (KV divides H) -> [S, H, Q, D]."""
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if softcap is None:
        bias = group.bias_for_window(sliding_window, query.dtype)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, scale=scaling, enable_gqa=num_heads != num_kv_heads
        )
    if num_heads != num_kv_heads:
        key = key.repeat_interleave(num_heads // num_kv_heads, dim=1)
        value = value.repeat_interleave(num_heads // num_kv_heads, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    mask = group.mask_for_window(sliding_window)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_metadata: PagedAttentionMetadata | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KV, T, D] for the T packed tokens -> ([1, T, H, D], None)."""
    if paged_metadata is None:
        raise RuntimeError(
            f"the {ATTENTION_NAME!r} attention runs only inside the protoserve engine (no paged_metadata given)"
        )
    layer_index: int = module.layer_idx  # type: ignore[assignment]
    key_cache = paged_metadata.key_caches[layer_index]
    value_cache = paged_metadata.value_caches[layer_index]
    # [1, KV, T, D] -> [T, KV, D], written at the tokens' slots.
    slot_mapping = paged_metadata.slot_mapping
    key_cache.index_copy_(0, slot_mapping, key[0].transpose(0, 1).to(key_cache.dtype))
    value_cache.index_copy_(0, slot_mapping, value[0].transpose(0, 1).to(value_cache.dtype))
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    output = attend_cached(query[0].transpose(0, 1), layer_index, paged_metadata, scaling, sliding_window, softcap)
    return output.unsqueeze(0), None


def attend_cached(
    packed_queries: torch.Tensor,
    layer_index: int,
    paged_metadata: PagedAttentionMetadata,
    scaling: float | None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The step's packed queries [T, H, D] against layer `layer_index`'s cache, where this step's
    keys and values are already written -> [T, H, D]."""
    key_cache = paged_metadata.key_caches[layer_index]
    value_cache = paged_metadata.value_caches[layer_index]
    output = torch.empty_like(packed_queries)
    decode_attention = paged_metadata.decode_attention
    if softcap is not None or key_cache.dtype != packed_queries.dtype:
        decode_attention = None
    for group in paged_metadata.groups:
        span = group.single_query_span
        if span is not None and decode_attention is not None:
            output[span[0] : span[0] + span[1]] = decode_attention(
                packed_queries[span[0] : span[0] + span[1]],
                key_cache,
                value_cache,
                group.key_slots,
                group.key_lengths,
                scaling if scaling is not None else packed_queries.shape[-1] ** -0.5,
                sliding_window,
            )
            continue
        if span is not None:
            group_queries = packed_queries[span[0] : span[0] + span[1]].unsqueeze(2)  # [S, H, 1, D]
        else:
            group_queries = packed_queries[group.query_index].permute(0, 2, 1, 3)  # [S, H, Q, D]
        group_keys = _gather(key_cache, group.key_slots, packed_queries.dtype)  # [S, KV, K, D]
        group_values = _gather(value_cache, group.key_slots, packed_queries.dtype)
        attended = _attend(group_queries, group_keys, group_values, group, sliding_window, scaling, softcap)
        if span is not None:
            output[span[0] : span[0] + span[1]] = attended.squeeze(2)
        else:
            attended = attended.permute(0, 2, 1, 3)  # [S, Q, H, D]
            output[group.query_index[group.query_valid]] = attended[group.query_valid]
    return output


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache [num_slots, KV, D] at slots [S, K] -> [S, KV, K, D] (a view of one flat gather)."""
    num_sequences, num_keys = slots.shape
    gathered = cache.index_select(0, slots.reshape(-1)).view(num_sequences, num_keys, *cache.shape[1:])
    return gathered.permute(0, 2, 1, 3).to(dtype)


def register_paged_attention() -> str:
    """Register the function with transformers (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
