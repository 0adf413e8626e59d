"""A lean forward for Llama-shaped decoders (Llama, SmolLM, Qwen2, Mistral without sliding windows).

transformers' forward is general: per layer it goes through module calls, keyword plumbing, mask
and cache logic the engine does not use, and it spends a few dozen small ops on norms and rotary
embeddings. At one running sequence a step is a memory-bound pass over the weights, so that
per-op overhead is a large share of it: SmolLM2-135M on 2 cores, one sequence, 46 ms per step
through transformers' forward against ~27 ms of matrix products; 38-40 ms through this one
(4 sequences: 44 -> 41 ms, 16: 89 -> 82 ms, 64: 291 -> 281 ms).

`FastDecoderForward` runs the same layers with the same weights, in the same order, over the
engine's packed tokens: q, k and v come out of one matrix product and gate and up out of
another (the modules' weights become views of the fused matrices, so no memory is added),
rotary embeddings are applied on the packed [tokens, heads, dim] layout, attention is the
engine's paged attention, the residual stream is updated in place (so the output, gate/up and
down products can stay transposed views, without a copy into row-major order), and only the rows
that need a sample go through the final norm and the LM head. Every matrix product is a
`LinearProduct` (packed_linear): oneDNN-packed weights at the row counts where they measured
faster on this machine, on the first call (on a 2-core Zen 5: 16 sequences 62 -> 36 ms per step,
64: 173 -> 121 ms), else `cpu_linear`'s forms. With the C++ kernels (`use_kernels`, cpu_kernels.py)
one op each does: a residual add and the RMSNorm after it; the rotary embeddings of q and k and
the cache write of k and v; SiLU(gate) x up (2-core Zen 5, all kernels against none: 16 sequences
39.8 -> 30.1 ms per step, 64: 96.4 -> 71.1 ms). Without them (on a GPU, where each op is a kernel
launch and host time per op is what a step costs at small batches) the torch ops are kept few: q
and k rotated in one pass, each norm one `rms_norm` (83 ops per layer, 98 before). The results
equal transformers' forward up to float rounding (the fused products sum in another order); the
engine's parity tests against `model.generate` run through it.

`fast_decoder_for(model)` returns None for any model it does not cover exactly (another class,
another activation, sliding windows, quantized or replaced linear layers, ...); the engine then
keeps transformers' forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from protoserve.server.engine.attention import PagedAttentionMetadata, attend_cached, paged_attention_forward
from protoserve.server.engine.cpu_kernels import CpuKernels
from protoserve.server.engine.packed_linear import LinearProduct, PackedPlan, cached_packed_plan
from transformers import PreTrainedModel

# Causal LM classes whose decoder layers are exactly: RMSNorm, attention (q/k/v/o linears, rotary,
# optional q/k/v biases), residual, RMSNorm, gated SiLU MLP (gate/up/down), residual.
COVERED_CLASSES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})
# Their norm classes, which all compute weight * (x / sqrt(mean(x^2) + eps)) in float32, rounded to
# the input's dtype before the weight: what the C++ kernels and `_rms_norm` compute.
STANDARD_RMS_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})


def fast_decoder_for(model: PreTrainedModel) -> FastDecoderForward | None:
    """The lean forward for `model`, or None when it is not covered (see `why_not_covered`)."""
    return FastDecoderForward(model) if why_not_covered(model) is None else None


def why_not_covered(model: Any) -> str | None:
    """None when the lean forward covers `model` exactly, else the first reason it does not."""
    name = type(model).__name__
    if name not in COVERED_CLASSES:
        return f"{name} is not one of {sorted(COVERED_CLASSES)}"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} is not silu"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp splits the linears"
    if getattr(config, "mlp_bias", False):
        return "the MLP has biases"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "some layers are not full attention"
    if getattr(model.model, "embed_scale", None) is not None or getattr(config, "logits_scaling", None):
        return "scaled embeddings or logits"
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj):
            if type(linear) is not torch.nn.Linear or not linear.weight.is_floating_point():
                return f"layer {attention.layer_idx} has a {type(linear).__name__} (quantized or replaced)"
        for linear in (mlp.up_proj, mlp.down_proj, model.lm_head):
            if type(linear) is not torch.nn.Linear or not linear.weight.is_floating_point():
                return f"a {type(linear).__name__} (quantized or replaced)"
        biases = [attention.q_proj.bias is None, attention.k_proj.bias is None, attention.v_proj.bias is None]
        if len(set(biases)) != 1:
            return "only some of q, k and v have biases"
    return None


class _FusedLayer:
    """One decoder layer's tensors, with q/k/v and gate/up fused."""

    def __init__(self, layer: Any) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.attention: Any = attention
        self.input_norm: Any = layer.input_layernorm
        self.post_norm: Any = layer.post_attention_layernorm
        biases = [attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]
        self.qkv = LinearProduct(
            _fuse_weights([attention.q_proj, attention.k_proj, attention.v_proj]),
            torch.cat([bias.detach() for bias in biases]) if biases[0] is not None else None,
        )
        self.q_size = attention.q_proj.out_features
        self.num_heads = self.q_size // attention.head_dim
        self.kv_size = attention.k_proj.out_features
        self.head_dim = attention.head_dim
        self.o = LinearProduct(attention.o_proj.weight, attention.o_proj.bias)
        self.gate_up = LinearProduct(_fuse_weights([mlp.gate_proj, mlp.up_proj]), None)
        self.intermediate = mlp.gate_proj.out_features
        self.down = LinearProduct(mlp.down_proj.weight, None)

    @property
    def products(self) -> list[LinearProduct]:
        return [self.qkv, self.o, self.gate_up, self.down]


def _fuse_weights(linears: list[torch.nn.Linear]) -> torch.Tensor:
    """Concatenate the linears' weights along the output rows and make each linear's weight a view
    of its rows, so that the fused matrix is the only copy."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    row = 0
    for linear in linears:
        rows = linear.out_features
        linear.weight = torch.nn.Parameter(fused[row : row + rows], requires_grad=False)
        row += rows
    return fused


class FastDecoderForward:
    """Packed tokens in, logits of the sampled rows out, for a covered model (`why_not_covered`)."""

    def __init__(self, model: PreTrainedModel) -> None:
        reason = why_not_covered(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not cover this model: {reason}")
        decoder: Any = model.model
        self.model = model
        self.decoder: Any = decoder
        self.layers = [_FusedLayer(layer) for layer in decoder.layers]
        self.rotary: Any = decoder.rotary_emb
        self.final_norm: Any = decoder.norm
        self.lm_head = LinearProduct(model.lm_head.weight, model.lm_head.bias)
        self.plan: PackedPlan | None = None  # measured on the first call, on the engine's thread
        self.kernels: CpuKernels | None = None
        # Every layer norm is transformers' own RMSNorm in the model's dtype: the kernels and
        # `_rms_norm` compute exactly it; otherwise the torch path calls the norm modules themselves.
        norms = [norm for layer in self.layers for norm in (layer.input_norm, layer.post_norm)]
        self.standard_norms = all(_is_standard_rms_norm(norm, self.lm_head.weight.dtype) for norm in norms)

    @property
    def products(self) -> list[LinearProduct]:
        """Every matrix product of a step, in order: the layers' four, then the LM head."""
        return [product for layer in self.layers for product in layer.products] + [self.lm_head]

    def set_plan(self, plan: PackedPlan) -> None:
        """Use the packed (oneDNN) or the dense form of the products as `plan` says per row count."""
        for product in self.products:
            product.apply_plan(plan)
        self.plan = plan

    def use_kernels(self, kernels: CpuKernels) -> bool:
        """Run the norms, rotary embeddings and cache writes through `kernels` from now on, where
        they cover this model exactly (standard RMSNorms, everything in one dtype); False if not."""
        if not self.standard_norms:
            return False
        self.kernels = kernels
        return True

    def __call__(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        positions: torch.Tensor,
        metadata: PagedAttentionMetadata,
        sample_rows: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids [T] or inputs_embeds [T, hidden], positions [T] -> logits [len(sample_rows), vocab].
        The first call measures which form of the products is faster here (packed_linear)."""
        if self.plan is None:
            self.set_plan(cached_packed_plan(self.products))
        # The residual stream is updated in place (it stays row-major whatever the layout of the
        # products added to it), so a caller's embeddings are copied first.
        hidden = inputs_embeds.clone() if inputs_embeds is not None else self.decoder.embed_tokens(input_ids)
        cos, sin = self.rotary(hidden, positions[None, :])
        cos, sin = cos[0], sin[0]  # [T, D]
        # The kernels take one dtype throughout (they raise otherwise); anything else stays in torch.
        same_dtype = hidden.dtype == cos.dtype == metadata.key_caches[0].dtype
        kernels = self.kernels if hidden.device.type == "cpu" and same_dtype and hidden.is_contiguous() else None
        if kernels is not None:
            self._layers_with_kernels(kernels, hidden, cos, sin, metadata)
        else:
            self._layers_in_torch(hidden, cos, sin, metadata)
        selected = hidden.index_select(0, sample_rows)
        return self.lm_head(self.final_norm(selected))

    def _layers_with_kernels(
        self,
        kernels: CpuKernels,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        metadata: PagedAttentionMetadata,
    ) -> None:
        """The decoder layers over `hidden` (updated in place) with the C++ layer ops. Each residual
        add is fused into the norm that follows it; the last MLP output is added at the end."""
        tokens = hidden.shape[0]
        pending: torch.Tensor | None = None  # the previous layer's MLP output, not yet added
        for layer in self.layers:
            attention = layer.attention
            norm = layer.input_norm
            if pending is None:
                normed = kernels.rms_norm(hidden, norm.weight, norm.variance_epsilon)
            else:
                normed = kernels.add_rms_norm(hidden, pending, norm.weight, norm.variance_epsilon)
            query = kernels.rotary_write_kv(
                layer.qkv(normed),
                cos,
                sin,
                metadata.key_caches[attention.layer_idx],
                metadata.value_caches[attention.layer_idx],
                metadata.slot_mapping,
                layer.num_heads,
            )
            attended = attend_cached(query, attention.layer_idx, metadata, attention.scaling)
            attention_output = layer.o(attended.reshape(tokens, -1), contiguous=False)
            norm = layer.post_norm
            normed = kernels.add_rms_norm(hidden, attention_output, norm.weight, norm.variance_epsilon)
            # silu_mul writes row-major, which the down product wants (see _layers_in_torch).
            activated = kernels.silu_mul(layer.gate_up(normed, contiguous=False))
            pending = layer.down(activated, contiguous=False)
        if pending is not None:
            hidden.add_(pending)

    def _layers_in_torch(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, metadata: PagedAttentionMetadata
    ) -> None:
        """The decoder layers over `hidden` (updated in place) in torch's ops."""
        tokens = hidden.shape[0]
        norm = _rms_norm if self.standard_norms else _call_norm
        for layer in self.layers:
            attended = self._attention_in_torch(layer, norm(layer.input_norm, hidden), cos, sin, metadata)
            hidden.add_(layer.o(attended.reshape(tokens, -1), contiguous=False))
            gate_up = layer.gate_up(norm(layer.post_norm, hidden), contiguous=False)
            # Written row-major: the down product is fast on a row-major input (W @ x^T with x^T
            # column-major), several times slower at a few rows on a transposed one.
            activated = torch.empty((tokens, layer.intermediate), dtype=hidden.dtype, device=hidden.device)
            torch.mul(F.silu(gate_up[:, : layer.intermediate]), gate_up[:, layer.intermediate :], out=activated)
            hidden.add_(layer.down(activated, contiguous=False))

    @staticmethod
    def _attention_in_torch(
        layer: _FusedLayer, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, metadata: PagedAttentionMetadata
    ) -> torch.Tensor:
        """q/k/v of the normed hidden states, rotary embeddings, cache write and attention in
        torch's ops -> [T, H, D]."""
        tokens = normed.shape[0]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D]
        qkv = layer.qkv(normed)
        # The rotary embeddings of q and k in one pass: their heads sit side by side in qkv.
        query_key = qkv[:, : layer.q_size + layer.kv_size].view(tokens, -1, layer.head_dim)
        query_key = query_key * cos + _rotate_half(query_key) * sin
        query, key = query_key[:, : layer.num_heads], query_key[:, layer.num_heads :]
        value = qkv[:, layer.q_size + layer.kv_size :].view(tokens, -1, layer.head_dim)
        attended, _ = paged_attention_forward(
            layer.attention,
            query.transpose(0, 1).unsqueeze(0),
            key.transpose(0, 1).unsqueeze(0),
            value.transpose(0, 1).unsqueeze(0),
            None,
            scaling=layer.attention.scaling,
            paged_metadata=metadata,
        )
        return attended[0]


def _is_standard_rms_norm(norm: Any, dtype: torch.dtype) -> bool:
    """transformers' own Llama, Qwen2 or Mistral RMSNorm (one formula; not a subclass or another
    module in its place), with a 1-D weight in `dtype` and a float epsilon."""
    epsilon = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    return (
        type(norm).__name__ in STANDARD_RMS_NORMS
        and type(norm).__module__.startswith("transformers.")
        and isinstance(epsilon, float)
        and isinstance(weight, torch.Tensor)
        and weight.dtype == dtype
        and weight.dim() == 1
    )


def _rms_norm(norm: Any, hidden: torch.Tensor) -> torch.Tensor:
    """What transformers' RMSNorm module computes (normalized in float32, rounded to the input's
    dtype, then scaled by the weight), with torch's one-op `rms_norm` in place of its chain of five."""
    normalized = F.rms_norm(hidden.to(torch.float32), hidden.shape[-1:], eps=norm.variance_epsilon)
    return norm.weight * normalized.to(hidden.dtype)


def _call_norm(norm: Any, hidden: torch.Tensor) -> torch.Tensor:
    return norm(hidden)


def _rotate_half(states: torch.Tensor) -> torch.Tensor:
    half = states.shape[-1] // 2
    return torch.cat((-states[..., half:], states[..., :half]), dim=-1)
