"""The lean forward for Llama-shaped decoders: which models it covers, that its logits equal
transformers' forward over the same paged cache, and that fusing the weights adds no memory."""

from __future__ import annotations

import copy

import pytest
import torch
from protoserve.server.engine.api import EngineConfig
from protoserve.server.engine.cpu_kernels import cpu_kernels as built_cpu_kernels
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.fast_decoder import (
    FastDecoderForward,
    _is_standard_rms_norm,
    _rms_norm,
    fast_decoder_for,
    why_not_covered,
)
from protoserve.server.engine.loader import loaded_from_model
from protoserve.server.engine.packed_linear import PackedPlan
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from .engine_fixtures import (
    TINY_DECODER_DIMENSIONS,
    build_model,
    greedy,
    random_prompts,
    run_until_done,
    submit,
    tiny_llama_config,
    word_tokenizer,
)

SMALL = TINY_DECODER_DIMENSIONS


def cpu_kernels_available() -> bool:
    return built_cpu_kernels() is not None


class OffsetRMSNorm(LlamaRMSNorm):
    """Not transformers' formula: the lean forward must call it as a module."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states) + 1.0


def with_offset_norm(model: torch.nn.Module) -> torch.nn.Module:
    old = model.model.layers[1].post_attention_layernorm
    replaced = OffsetRMSNorm(old.weight.shape[0], eps=old.variance_epsilon)
    replaced.load_state_dict(old.state_dict())
    model.model.layers[1].post_attention_layernorm = replaced
    return model


def covered_models() -> list[tuple[str, torch.nn.Module]]:
    return [
        ("llama", build_model(tiny_llama_config())),
        ("llama with a norm of its own", with_offset_norm(build_model(tiny_llama_config(), seed=6))),
        ("llama with attention biases", build_model(tiny_llama_config(attention_bias=True), seed=3)),
        ("qwen2 (q/k/v biases)", build_model(Qwen2Config(**SMALL), Qwen2ForCausalLM, seed=4)),
        ("mistral without a window", build_model(MistralConfig(**SMALL, sliding_window=None), MistralForCausalLM)),
    ]


@pytest.mark.parametrize(("label", "model"), covered_models(), ids=[label for label, _ in covered_models()])
def test_covered_models_get_the_lean_forward(label: str, model: torch.nn.Module) -> None:
    assert why_not_covered(model) is None, label
    engine = LLMEngine(loaded_from_model(copy.deepcopy(model), word_tokenizer()), EngineConfig(kv_cache_bytes=1 << 20))
    assert isinstance(engine.runner.fast_forward, FastDecoderForward)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (build_model(MistralConfig(**SMALL, sliding_window=6), MistralForCausalLM), "sliding-window"),
        (build_model(Gemma2Config(**SMALL, head_dim=16), Gemma2ForCausalLM), "Gemma2ForCausalLM"),
        (build_model(tiny_llama_config(hidden_act="gelu")), "activation"),
        (build_model(tiny_llama_config(mlp_bias=True)), "MLP has biases"),
    ],
)
def test_other_models_keep_transformers_forward(model: torch.nn.Module, reason: str) -> None:
    assert reason in (why_not_covered(model) or "")
    assert fast_decoder_for(model) is None
    engine = LLMEngine(loaded_from_model(copy.deepcopy(model), word_tokenizer()), EngineConfig(kv_cache_bytes=1 << 20))
    assert engine.runner.fast_forward is None
    with pytest.raises(ValueError, match="does not cover"):
        FastDecoderForward(model)


def test_a_replaced_linear_is_not_covered() -> None:
    class Replaced(torch.nn.Linear):
        pass

    model = build_model(tiny_llama_config())
    old = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = Replaced(old.in_features, old.out_features, bias=False)
    assert "Replaced" in (why_not_covered(model) or "")


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["C++ layer ops", "torch ops"])
@pytest.mark.parametrize("plan", [PackedPlan.dense_only(), PackedPlan.packed_only()], ids=["dense", "packed"])
@pytest.mark.parametrize(("label", "model"), covered_models(), ids=[label for label, _ in covered_models()])
def test_logits_equal_transformers_forward_step_by_step(
    label: str, model: torch.nn.Module, plan: PackedPlan, cpu_kernels: bool
) -> None:
    """Two engines over the same weights, one with the lean forward switched off, run the same
    mixed prefill/decode steps; every step's logits agree to float rounding, with the products
    in the dense and in the oneDNN-packed form, and the norms and rotary embeddings in the C++
    kernels (cpu_kernels.py) or in torch's ops."""
    config = EngineConfig(kv_cache_bytes=1 << 20, block_size=4, max_num_batched_tokens=20, cpu_kernels=cpu_kernels)
    lean = LLMEngine(loaded_from_model(copy.deepcopy(model), word_tokenizer()), config)
    assert lean.runner.fast_forward is not None
    # The kernels compute only transformers' own norms; a model with another keeps torch's ops.
    uses_kernels = cpu_kernels and cpu_kernels_available() and lean.runner.fast_forward.standard_norms
    assert (lean.runner.fast_forward.kernels is not None) == uses_kernels
    lean.runner.fast_forward.set_plan(plan)
    stock = LLMEngine(loaded_from_model(copy.deepcopy(model), word_tokenizer()), config)
    stock.runner.fast_forward = None
    captured: dict[str, list[torch.Tensor]] = {"lean": [], "stock": []}
    for name, engine in (("lean", lean), ("stock", stock)):
        original = engine.runner.execute

        def recording(output, original=original, name=name):
            logits = original(output)
            captured[name].append(logits.clone())
            return logits

        engine.runner.execute = recording  # type: ignore[method-assign]
        prompts = random_prompts(4, 3, 25, seed=12)
        submit(engine, prompts, greedy(6))
        run_until_done(engine)
    assert len(captured["lean"]) == len(captured["stock"]) > 3
    for lean_logits, stock_logits in zip(captured["lean"], captured["stock"], strict=True):
        torch.testing.assert_close(lean_logits, stock_logits, rtol=1e-4, atol=1e-4)


def test_fused_weights_are_views_and_add_no_memory() -> None:
    model = build_model(tiny_llama_config())
    before = sum(p.numel() for p in model.parameters())
    reference = copy.deepcopy(model)
    forward = FastDecoderForward(model)
    layer = forward.layers[0]
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == layer.qkv.weight.data_ptr()
    assert attention.k_proj.weight.untyped_storage().data_ptr() == layer.qkv.weight.untyped_storage().data_ptr()
    assert model.model.layers[0].mlp.up_proj.weight.untyped_storage().data_ptr() == (
        layer.gate_up.weight.untyped_storage().data_ptr()
    )
    assert sum(p.numel() for p in model.parameters()) == before
    for (name, fused), (_, original) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(fused, original), name
    assert isinstance(model, LlamaForCausalLM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen2RMSNorm])
def test_one_op_rms_norm_equals_the_module(norm_class: type[torch.nn.Module], dtype: torch.dtype) -> None:
    """The torch path's norm (torch's rms_norm) gives what the module gives, bit for bit on the CPU,
    including the rounding to bfloat16 before the weight."""
    generator = torch.Generator().manual_seed(5)
    norm = norm_class(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=generator) + 0.5)
    hidden = (torch.randn(7, 48, generator=generator) * 3).to(dtype)
    assert _is_standard_rms_norm(norm, dtype)
    assert torch.equal(_rms_norm(norm, hidden), norm(hidden))


def test_other_norms_are_called_as_modules() -> None:
    """A norm that is not transformers' own (a subclass with another formula, a weight in another
    dtype) turns the C++ kernels down and keeps its module call in the torch path (whose logits the
    step-by-step test compares for the "norm of its own" model)."""
    assert not _is_standard_rms_norm(OffsetRMSNorm(8), torch.float32)
    assert not _is_standard_rms_norm(LlamaRMSNorm(8).to(torch.bfloat16), torch.float32)
    plain = build_model(tiny_llama_config())
    forward = FastDecoderForward(with_offset_norm(copy.deepcopy(plain)))
    assert not forward.standard_norms
    kernels = built_cpu_kernels()
    if kernels is not None:
        assert not forward.use_kernels(kernels)
    assert FastDecoderForward(plain).standard_norms
