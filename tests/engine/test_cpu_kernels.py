"""The C++ CPU kernels (cpu_kernels.py): they build here, decode attention equals the torch path
(gather + SDPA) over a paged cache, bad inputs raise instead of reading out of bounds, a failed
build leaves the engine on the torch path, and the engine's greedy output is unchanged."""

from __future__ import annotations

import copy
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.engine import cpu_kernels as cpu_kernels_module
from protoserve.server.engine.api import EngineConfig
from protoserve.server.engine.attention import PagedAttentionMetadata, build_attention_group, paged_attention_forward
from protoserve.server.engine.cpu_kernels import CpuKernels, cpu_kernels
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.fast_decoder import _rotate_half
from protoserve.server.engine.loader import loaded_from_model
from protoserve.server.model_loading import TransformersModelLoader
from protoserve.server.registry import ServedGenerationModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .engine_fixtures import (
    build_model,
    greedy,
    random_prompts,
    reference_greedy,
    run_until_done,
    submit,
    tiny_llama_config,
    word_tokenizer,
)

BLOCK_SIZE = 4
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the engine keeps torch's ops")
    built = cpu_kernels()
    assert built is not None, f"a compiler is here but the build failed: {cpu_kernels_module.build_failure()}"
    return built


class _Layer(torch.nn.Module):
    def __init__(self, sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer_idx = 0
        self.sliding_window = sliding_window


def _paged_case(
    lengths: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Random caches with each sequence's blocks scattered over the cache, and one query per sequence."""
    generator = torch.Generator().manual_seed(seed)
    slots = NUM_BLOCKS * BLOCK_SIZE
    key_cache = torch.randn(slots, num_kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(slots, num_kv_heads, head_dim, generator=generator).to(dtype)
    free_blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    tables = []
    for length in lengths:
        count = -(-length // BLOCK_SIZE)
        tables.append([free_blocks.pop() for _ in range(count)])
    query = torch.randn(len(lengths), num_heads, head_dim, generator=generator).to(dtype)
    return query, key_cache, value_cache, tables


def _attend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    lengths: list[int],
    tables: list[list[int]],
    kernel: CpuKernels | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One decode step through paged_attention_forward: the new token of each sequence is its last."""
    count = len(lengths)
    group = build_attention_group(
        list(range(count)), [1] * count, [length - 1 for length in lengths], tables, BLOCK_SIZE, torch.device("cpu")
    )
    slot_mapping = [
        tables[s][(length - 1) // BLOCK_SIZE] * BLOCK_SIZE + (length - 1) % BLOCK_SIZE
        for s, length in enumerate(lengths)
    ]
    metadata = PagedAttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping),
        groups=[group],
        key_caches=[key_cache],
        value_caches=[value_cache],
        decode_attention=kernel.paged_decode_attention if kernel is not None else None,
    )
    # The new tokens' keys and values are the ones already at their slots, so the write changes nothing.
    new_keys = key_cache[slot_mapping].transpose(0, 1).unsqueeze(0)
    new_values = value_cache[slot_mapping].transpose(0, 1).unsqueeze(0)
    output, _ = paged_attention_forward(
        _Layer(sliding_window),
        query.transpose(0, 1).unsqueeze(0),
        new_keys,
        new_values,
        None,
        scaling=0.3,
        paged_metadata=metadata,
    )
    return output[0]


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 128), (8, 2, 16), (6, 2, 80)],
    ids=["gqa3-d64", "mha-d128", "gqa4-d16", "gqa3-d80"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_equals_the_torch_path(
    kernels: CpuKernels, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    lengths = [1, 5, 4, 17, 33, 2, 64]
    query, key_cache, value_cache, tables = _paged_case(lengths, num_heads, num_kv_heads, head_dim, dtype)
    expected = _attend(query, key_cache, value_cache, lengths, tables, None)
    actual = _attend(query, key_cache, value_cache, lengths, tables, kernels)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # the kernel computes in float32, SDPA in bf16
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


def test_decode_attention_honours_a_sliding_window(kernels: CpuKernels) -> None:
    lengths = [3, 9, 20]
    query, key_cache, value_cache, tables = _paged_case(lengths, 4, 2, 32, torch.float32, seed=5)
    expected = _attend(query, key_cache, value_cache, lengths, tables, None, sliding_window=6)
    actual = _attend(query, key_cache, value_cache, lengths, tables, kernels, sliding_window=6)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    unwindowed = _attend(query, key_cache, value_cache, lengths, tables, kernels)
    assert not torch.allclose(actual[1:], unwindowed[1:])


def test_bad_inputs_raise_instead_of_reading_out_of_bounds(kernels: CpuKernels) -> None:
    query, key_cache, value_cache, _ = _paged_case([4], 4, 2, 16, torch.float32)
    slots = torch.tensor([[0, 1, 2, 3]])
    lengths = torch.tensor([4])
    attend = kernels.paged_decode_attention
    attend(query, key_cache, value_cache, slots, lengths, 1.0, None)  # the well-formed call works
    with pytest.raises(RuntimeError, match="slot out of range"):
        attend(query, key_cache, value_cache, torch.tensor([[0, 1, 2, NUM_BLOCKS * BLOCK_SIZE]]), lengths, 1.0, None)
    with pytest.raises(RuntimeError, match="slot out of range"):
        attend(query, key_cache, value_cache, torch.tensor([[0, -1, 2, 3]]), lengths, 1.0, None)
    with pytest.raises(RuntimeError, match="key length out of range"):
        attend(query, key_cache, value_cache, slots, torch.tensor([5]), 1.0, None)
    with pytest.raises(RuntimeError, match="key length out of range"):
        attend(query, key_cache, value_cache, slots, torch.tensor([0]), 1.0, None)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        attend(torch.zeros(1, 3, 16), key_cache, value_cache, slots, lengths, 1.0, None)
    with pytest.raises(RuntimeError, match="head size"):
        attend(torch.zeros(1, 4, 8), key_cache, value_cache, slots, lengths, 1.0, None)
    with pytest.raises(RuntimeError, match="dtype"):
        attend(query.double(), key_cache, value_cache, slots, lengths, 1.0, None)
    with pytest.raises(RuntimeError, match="int64"):
        attend(query, key_cache, value_cache, slots.int(), lengths, 1.0, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 7, 300], ids=["1 row", "7 rows", "300 rows"])
def test_rms_norm_equals_transformers(kernels: CpuKernels, dtype: torch.dtype, rows: int) -> None:
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    norm = norm.to(dtype)
    hidden = (torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    normed = kernels.rms_norm(hidden, norm.weight, 1e-5)
    torch.testing.assert_close(normed, norm(hidden), rtol=tolerance, atol=tolerance)
    # A view with a row stride (a slice of a wider matrix) reads the right elements.
    wide = torch.randn(rows, 128).to(dtype)
    torch.testing.assert_close(
        kernels.rms_norm(wide[:, 32:], norm.weight, 1e-5), norm(wide[:, 32:]), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_write_kv_equals_torch_and_writes_the_slots(kernels: CpuKernels, dtype: torch.dtype) -> None:
    tokens, heads, kv_heads, dim = 5, 6, 2, 16
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(dtype)
    angles = torch.rand(tokens, dim // 2, generator=generator) * 6
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(dtype)
    key_cache = torch.zeros(32, kv_heads, dim, dtype=dtype)
    value_cache = torch.zeros(32, kv_heads, dim, dtype=dtype)
    slots = torch.tensor([9, 3, 30, 0, 17])
    query = kernels.rotary_write_kv(qkv, cos, sin, key_cache, value_cache, slots, heads)

    def rotated(states: torch.Tensor) -> torch.Tensor:
        return states * cos[:, None, :] + _rotate_half(states) * sin[:, None, :]

    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    if dtype == torch.float32:  # rounded as torch rounds: equal bit for bit
        assert torch.equal(query, rotated(q)) and torch.equal(key_cache[slots], rotated(k))
    else:
        torch.testing.assert_close(query, rotated(q), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(key_cache[slots], rotated(k), rtol=2e-2, atol=2e-2)
    assert torch.equal(value_cache[slots], v)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert not key_cache[untouched].any() and not value_cache[untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major delta", "transposed delta"])
def test_add_rms_norm_adds_in_place_then_normalizes(kernels: CpuKernels, dtype: torch.dtype, transposed: bool) -> None:
    norm = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    norm = norm.to(dtype)
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(6, 48, generator=generator).to(dtype)
    delta = torch.randn(48, 6, generator=generator).to(dtype).t() if transposed else torch.randn(6, 48).to(dtype)
    expected_hidden = hidden + delta
    normed = kernels.add_rms_norm(hidden, delta, norm.weight, 1e-6)
    assert torch.equal(hidden, expected_hidden)  # the residual add rounds as torch's add does
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, norm(expected_hidden), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
def test_silu_mul_equals_torch(kernels: CpuKernels, dtype: torch.dtype, transposed: bool) -> None:
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(7, 2 * 40, generator=generator) * 6
    values[0, :4] = torch.tensor([-200.0, -88.5, 90.0, 0.0])  # past the exponential's clamp, and zero
    values = values.to(dtype)
    gate_up = values.t().contiguous().t() if transposed else values
    expected = torch.nn.functional.silu(values[:, :40]) * values[:, 40:]
    activated = kernels.silu_mul(gate_up)
    assert activated.is_contiguous() and activated.shape == (7, 40)
    tolerance = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(activated, expected, rtol=tolerance, atol=tolerance)


def test_layer_op_bad_inputs_raise(kernels: CpuKernels) -> None:
    weight = torch.ones(8)
    with pytest.raises(RuntimeError, match="weight"):
        kernels.rms_norm(torch.ones(2, 9), weight, 1e-6)
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.rms_norm(torch.ones(2, 8, dtype=torch.float64), weight, 1e-6)
    with pytest.raises(RuntimeError, match="unit column stride"):
        kernels.rms_norm(torch.ones(8, 2).t(), weight, 1e-6)
    with pytest.raises(RuntimeError, match="differ in shape"):
        kernels.add_rms_norm(torch.ones(2, 8), torch.ones(3, 8), weight, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous hidden states"):
        kernels.add_rms_norm(torch.ones(8, 2).t(), torch.ones(2, 8), weight, 1e-6)
    with pytest.raises(RuntimeError, match="2 x intermediate"):
        kernels.silu_mul(torch.ones(2, 7))
    qkv, cos, sin = torch.ones(2, 4 * 8), torch.ones(2, 8), torch.zeros(2, 8)
    caches = torch.zeros(4, 1, 8), torch.zeros(4, 1, 8)
    kernels.rotary_write_kv(qkv, cos, sin, *caches, torch.tensor([0, 3]), 2)  # the well-formed call works
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.rotary_write_kv(qkv, cos, sin, *caches, torch.tensor([0, 4]), 2)
    with pytest.raises(RuntimeError, match="one int64 slot per token"):
        kernels.rotary_write_kv(qkv, cos, sin, *caches, torch.tensor([0]), 2)
    with pytest.raises(RuntimeError, match="qkv width"):
        kernels.rotary_write_kv(qkv, cos, sin, *caches, torch.tensor([0, 1]), 3)
    with pytest.raises(RuntimeError, match="cos and sin"):
        kernels.rotary_write_kv(qkv, cos[:1], sin[:1], *caches, torch.tensor([0, 1]), 2)
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.rotary_write_kv(qkv, cos.double(), sin, *caches, torch.tensor([0, 1]), 2)


@pytest.fixture
def forget_built_kernels() -> Iterator[None]:
    """Let a test see cpu_kernels() build from scratch, then restore what the process had."""
    saved = cpu_kernels_module._kernels, cpu_kernels_module._failure
    cpu_kernels_module._kernels, cpu_kernels_module._failure = None, None
    yield
    cpu_kernels_module._kernels, cpu_kernels_module._failure = saved


def test_a_failed_build_is_logged_once_and_the_engine_keeps_torch_attention(
    forget_built_kernels: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[int] = []

    def failing_build() -> object:
        attempts.append(1)
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(cpu_kernels_module, "_build", failing_build)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels_module.__name__):
        assert cpu_kernels() is None
        assert cpu_kernels() is None
    assert attempts == [1]
    assert "c++: not found" in caplog.text
    assert "c++: not found" in (cpu_kernels_module.build_failure() or "")
    model = build_model(tiny_llama_config())
    engine = LLMEngine(loaded_from_model(copy.deepcopy(model), word_tokenizer()), EngineConfig(kv_cache_bytes=1 << 20))
    assert engine.runner.decode_attention is None
    prompts = random_prompts(3, 3, 12, seed=2)
    submit(engine, prompts, greedy(5))
    collected = run_until_done(engine)
    for index, prompt in enumerate(prompts):
        assert collected[f"r{index}"].token_ids[0] == reference_greedy(model, prompt, 5)


async def test_the_server_builds_the_kernels_in_a_loading_thread(
    forget_built_kernels: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first build compiles for ~30 s: the model loader runs it off the event loop."""
    folder = tmp_path / "tiny-llama"
    build_model(tiny_llama_config()).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    built_in: list[str] = []
    real_build = cpu_kernels_module._build

    def recording_build() -> object:
        built_in.append(threading.current_thread().name)
        return real_build()

    monkeypatch.setattr(cpu_kernels_module, "_build", recording_build)
    loader = TransformersModelLoader(ServerConfig(dtype="float32", device="cpu"))
    served = await loader.load(ModelSpec("tiny", str(folder)))
    assert isinstance(served, ServedGenerationModel)
    try:
        assert len(built_in) == 1 and built_in[0].startswith("protoserve-load-")
        assert served.engine.engine.runner.decode_attention is not None
    finally:
        await served.engine.shutdown()


def test_the_library_name_follows_the_source_and_the_cache_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    name = cpu_kernels_module.library_name()
    assert name.startswith("protoserve_cpu_kernels_") and name == cpu_kernels_module.library_name()
    monkeypatch.setattr(cpu_kernels_module, "COMPILE_FLAGS", ("-O2",))
    assert cpu_kernels_module.library_name() != name
    monkeypatch.setenv(cpu_kernels_module.CACHE_DIR_ENVIRONMENT_VARIABLE, str(tmp_path))
    assert str(cpu_kernels_module.kernel_cache_dir()) == str(tmp_path)


@pytest.mark.parametrize("enabled", [True, False], ids=["kernel", "torch"])
def test_engine_greedy_output_equals_generate_with_and_without_the_kernel(kernels: CpuKernels, enabled: bool) -> None:
    """Mixed prefill and decode steps of several sequences, blocks of 4 tokens, against plain generate."""
    model = build_model(tiny_llama_config())
    config = EngineConfig(kv_cache_bytes=1 << 20, block_size=4, max_num_batched_tokens=24, cpu_kernels=enabled)
    engine = LLMEngine(loaded_from_model(copy.deepcopy(model), word_tokenizer()), config)
    assert (engine.runner.decode_attention is not None) == enabled
    assert engine.runner.fast_forward is not None
    assert (engine.runner.fast_forward.kernels is not None) == enabled
    calls: list[int] = []
    if enabled:
        kernel = engine.runner.decode_attention
        assert kernel is not None

        def counting(*args: object) -> torch.Tensor:
            calls.append(1)
            return kernel(*args)  # type: ignore[arg-type]

        engine.runner.decode_attention = counting
    prompts = random_prompts(5, 3, 30, seed=9)
    submit(engine, prompts, greedy(12))
    collected = run_until_done(engine)
    for index, prompt in enumerate(prompts):
        assert collected[f"r{index}"].token_ids[0] == reference_greedy(model, prompt, 12), index
    assert bool(calls) == enabled


def test_a_build_failure_keeps_the_compilers_error_lines() -> None:
    message = "Error building extension 'x':\n" + "\n".join(f"[{i}/4] c++ -O3 flags {i}" for i in range(40))
    message += "\nkernels.cpp:12:5: error: 'y' was not declared in this scope\nninja: build stopped"
    summary = cpu_kernels_module._summary(message)
    assert "'y' was not declared" in summary and "ninja: build stopped" in summary
    assert "[3/4]" not in summary
