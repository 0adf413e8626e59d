"""Tensors in, logits out: owns the model and its paged KV cache and runs one forward per step.

Every step packs the scheduled tokens of all sequences (prefill chunks and decodes) into one row,
with explicit position ids, and passes the paged-attention metadata through the model's kwargs.
Only the rows of sequences that need a sample go through the LM head (`logits_to_keep` with a
tensor of packed positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from protoserve.server.engine.api import EngineConfig
from protoserve.server.engine.attention import (
    AttentionGroup,
    DecodeAttention,
    PagedAttentionMetadata,
    build_attention_group,
    register_paged_attention,
)
from protoserve.server.engine.cpu_kernels import cpu_kernels
from protoserve.server.engine.cpu_linear import use_row_split_linears
from protoserve.server.engine.errors import UnsupportedModelError
from protoserve.server.engine.fast_decoder import FastDecoderForward, fast_decoder_for
from protoserve.server.engine.multimodal import compute_prompt_embeddings
from protoserve.server.engine.packed_linear import PackedPlan
from protoserve.server.engine.scheduler import ScheduledSequence, SchedulerOutput
from transformers import PreTrainedModel

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024 * 1024
# Layer kinds the paged attention can drive; anything else (mamba, linear attention, ...) is refused.
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# 3-D (multimodal) rotary position ids; plain 1-D positions would silently give wrong outputs.
MROPE_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni", "glm4v"})


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size


def _bidirectional_text_attention(model: PreTrainedModel) -> str | None:
    """The name of an attention layer of the text model that is not causal, or None.

    transformers marks each attention module with `is_causal`. Encoder-only models loaded through
    AutoModelForCausalLM (a BertForMaskedLM checkpoint becomes BertLMHeadModel with is_decoder False)
    keep bidirectional attention, which the paged attention (always causal) would silently change.
    Only the layers the paged attention would drive count: modules with a `layer_idx` configured by
    the text config (the config it sets the attention implementation on). A vision tower's encoder
    is rightly bidirectional and keeps its own attention. Modules without the flag count as causal."""
    text_config = model.config.get_text_config()
    for module_name, module in model.named_modules():
        if (
            getattr(module, "config", None) is text_config
            and hasattr(module, "layer_idx")
            and getattr(module, "is_causal", True) is False
        ):
            return module_name
    return None


def check_supported(model: PreTrainedModel) -> None:
    """Raise UnsupportedModelError for architectures the paged attention cannot drive, and for models
    that are not causal decoders (encoder-only models, whose attention is bidirectional)."""
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; the engine serves decoder-only models")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not route attention through transformers' AttentionInterface, so the paged "
            "KV cache cannot drive it"
        )
    text_config = config.get_text_config()
    model_types = {getattr(config, "model_type", ""), getattr(text_config, "model_type", "")}
    if model_types & MROPE_MODEL_TYPES:
        raise UnsupportedModelError(f"{name} uses 3-D multimodal rotary positions, which the engine does not support")
    layer_types = set(getattr(text_config, "layer_types", None) or [])
    unsupported = layer_types - SUPPORTED_LAYER_TYPES
    if unsupported:
        raise UnsupportedModelError(
            f"{name} has {', '.join(sorted(unsupported))} layers; the engine supports only attention layers"
        )
    if getattr(text_config, "attention_chunk_size", None):
        raise UnsupportedModelError(f"{name} uses chunked local attention, which the engine does not support")
    bidirectional = _bidirectional_text_attention(model)
    if bidirectional is not None:
        raise UnsupportedModelError(
            f"{name} attends in both directions ({bidirectional} has is_causal False): it is an encoder "
            "(BERT-like, masked LM) or a prefix-LM, not a causal decoder, and the engine generates only "
            "with causal decoders"
        )


def kv_cache_shape(model: PreTrainedModel, dtype: torch.dtype) -> KVCacheShape:
    text_config = model.config.get_text_config()
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    return KVCacheShape(text_config.num_hidden_layers, num_kv_heads, head_dim, dtype)


def num_kv_blocks(config: EngineConfig, shape: KVCacheShape, device: torch.device) -> int:
    """How many blocks fit in the configured memory (bytes given, else a CPU default or a GPU fraction)."""
    if config.kv_cache_bytes is not None:
        budget = config.kv_cache_bytes
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * config.kv_cache_memory_fraction)
    else:
        budget = DEFAULT_CPU_KV_CACHE_BYTES
    blocks = budget // (shape.bytes_per_token * config.block_size)
    if blocks < 1:
        raise ValueError(
            f"a KV cache of {budget} bytes holds no block of {config.block_size} tokens "
            f"({shape.bytes_per_token} bytes per token); raise kv_cache_bytes"
        )
    return int(blocks)


class ModelRunner:
    """Owns the model, its KV tensors, and the per-step packing of inputs."""

    def __init__(self, model: PreTrainedModel, config: EngineConfig, image_token_id: int | None = None) -> None:
        check_supported(model)
        self.model = model
        self.config = config
        self.image_token_id = image_token_id
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype if parameter.is_floating_point() else torch.float32
        self.shape = kv_cache_shape(model, self.dtype)
        self.num_blocks = num_kv_blocks(config, self.shape, self.device)
        self.block_size = config.block_size
        num_slots = self.num_blocks * self.block_size
        cache_dims = (num_slots, self.shape.num_kv_heads, self.shape.head_dim)
        self.key_caches = [
            torch.zeros(cache_dims, dtype=self.dtype, device=self.device) for _ in range(self.shape.num_layers)
        ]
        self.value_caches = [
            torch.zeros(cache_dims, dtype=self.dtype, device=self.device) for _ in range(self.shape.num_layers)
        ]
        attention_name = register_paged_attention()
        model.config.get_text_config()._attn_implementation = attention_name
        self._check_attention_dispatch(attention_name)
        use_row_split_linears(model)
        self.input_embeddings = model.get_input_embeddings()
        # The lean forward for Llama-shaped decoders; None keeps transformers' forward.
        self.fast_forward: FastDecoderForward | None = fast_decoder_for(model)
        if self.fast_forward is not None and not config.packed_weights:
            self.fast_forward.set_plan(PackedPlan.dense_only())
        # The C++ kernels (cpu_kernels.py) when enabled and buildable here: decode attention for
        # every model; the norms, rotary embeddings, cache writes and activation for the lean forward.
        kernels = cpu_kernels() if config.cpu_kernels and self.device.type == "cpu" else None
        self.decode_attention: DecodeAttention | None = kernels.paged_decode_attention if kernels else None
        if kernels is not None and self.fast_forward is not None:
            self.fast_forward.use_kernels(kernels)

    def _check_attention_dispatch(self, attention_name: str) -> None:
        """Every attention layer must now read the paged implementation from its config."""
        for module in self.model.modules():
            if hasattr(module, "layer_idx") and hasattr(module, "config") and hasattr(module, "q_proj"):
                if getattr(module.config, "_attn_implementation", None) != attention_name:
                    raise UnsupportedModelError(
                        f"{type(self.model).__name__}: layer {module.layer_idx} does not pick up the paged attention"
                    )

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination) in every layer: copy-on-write for forked choices."""
        size = self.block_size
        for source, destination in copies:
            for cache in (*self.key_caches, *self.value_caches):
                cache[destination * size : (destination + 1) * size] = cache[source * size : (source + 1) * size]

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        size = self.block_size
        return [block_table[position // size] * size + position % size for position in range(start, end)]

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        """Run the step's forward. Returns float32 logits [rows, vocab] in the order of
        `output.scheduled`: one row per sequence needing a sample, `1 + len(drafts)` rows for a
        sequence with drafts (after its real last token, then after each draft)."""
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_indices: list[int] = []
        decodes: list[tuple[int, ScheduledSequence]] = []
        prefills: list[tuple[int, ScheduledSequence]] = []
        embedding_rows: list[tuple[int, ScheduledSequence]] = []
        for item in output.scheduled:
            sequence, start, end = item.sequence, item.start, item.start + item.num_new_tokens
            packed_start = len(token_ids)
            token_ids.extend(sequence.token_ids[start : start + item.num_real_tokens])
            token_ids.extend(item.draft_token_ids)
            positions.extend(range(start, end))
            slot_mapping.extend(self._slots(sequence.block_table, start, end))
            (decodes if item.num_new_tokens == 1 else prefills).append((packed_start, item))
            if item.draft_token_ids:  # one row for the real last token and one after each draft
                sample_indices.extend(range(len(token_ids) - item.num_new_tokens, len(token_ids)))
            elif item.needs_sample:
                sample_indices.append(len(token_ids) - 1)
            if sequence.request.request.multimodal is not None and start < sequence.num_prompt_tokens:
                embedding_rows.append((packed_start, item))

        groups = [self._group(members) for members in (decodes, prefills) if members]
        metadata = PagedAttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            groups=groups,
            key_caches=self.key_caches,
            value_caches=self.value_caches,
            decode_attention=self.decode_attention,
        )
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        model_inputs: dict[str, torch.Tensor] = {}
        if embedding_rows:
            embeddings = self.input_embeddings(input_ids)
            for packed_start, item in embedding_rows:
                prompt_embeddings = self._prompt_embeddings(item)
                end = min(item.start + item.num_new_tokens, item.sequence.num_prompt_tokens)
                embeddings[0, packed_start : packed_start + end - item.start] = prompt_embeddings[item.start : end]
            model_inputs["inputs_embeds"] = embeddings
        else:
            model_inputs["input_ids"] = input_ids
        nothing_to_sample = not sample_indices  # only prefill chunks that stop short of the prompt's end
        if nothing_to_sample:
            sample_indices = [len(token_ids) - 1]  # keeps the LM head's input non-empty; dropped below
        position_ids = torch.tensor(positions, dtype=torch.long, device=self.device)
        sample_rows = torch.tensor(sample_indices, dtype=torch.long, device=self.device)
        if self.fast_forward is not None:
            embeddings = model_inputs.get("inputs_embeds")
            logits = self.fast_forward(
                input_ids[0] if embeddings is None else None,
                embeddings[0] if embeddings is not None else None,
                position_ids,
                metadata,
                sample_rows,
            ).float()
        else:
            result = self.model(
                **model_inputs,
                position_ids=position_ids[None, :],
                use_cache=False,
                logits_to_keep=sample_rows,
                paged_metadata=metadata,
            )
            logits = result.logits[0].float()
        return logits[:0] if nothing_to_sample else logits

    def _prompt_embeddings(self, item: ScheduledSequence) -> torch.Tensor:
        sequence = item.sequence
        if sequence.prompt_embeddings is None:
            multimodal = sequence.request.request.multimodal
            if multimodal is None:
                raise RuntimeError(f"sequence {sequence.sequence_id} has no multimodal inputs")
            sequence.prompt_embeddings = compute_prompt_embeddings(
                self.model, sequence.token_ids[: sequence.num_prompt_tokens], multimodal, self.image_token_id
            )
        return sequence.prompt_embeddings

    def _group(self, members: list[tuple[int, ScheduledSequence]]) -> AttentionGroup:
        return build_attention_group(
            query_starts=[packed_start for packed_start, _ in members],
            query_lengths=[item.num_new_tokens for _, item in members],
            context_starts=[item.start for _, item in members],
            block_tables=[item.sequence.block_table for _, item in members],
            block_size=self.block_size,
            device=self.device,
        )
