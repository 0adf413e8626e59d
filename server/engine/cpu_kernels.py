"""C++ kernels for the CPU, built on this machine on first use.

- Decode attention over the paged KV cache (`csrc/paged_decode_attention.cpp`): each sequence's
  keys and values are read in place from their slots, where the torch path gathers them into a
  padded copy per layer and runs SDPA over the copy. On a 2-core Zen 5, 16 sequences of 110
  tokens in blocks spread over the cache, 30 layers' caches (so they come from memory, as in a
  step): ~125 us per layer against ~240-270 us (~150 before the softmax's exponentials went
  through `csrc/vector_math.h`'s vectorizable e^x instead of a libm call per score).
- The lean forward's small per-layer ops (`csrc/decoder_layer_ops.cpp`): RMSNorm (alone or after
  the residual add), rotary embeddings of q and k with the cache write of k and v, and SiLU(gate) x
  up, each one pass instead of 3-20 torch ops.

The source is compiled with the machine's C++ compiler through `torch.utils.cpp_extension` (ninja
comes from the `ninja` package) for this CPU (`-march=native`), once: the library lands in
`$PROTOSERVE_KERNEL_CACHE_DIR` (default `~/.cache/protoserve/kernels`), in a folder named after a
digest of the source, the flags, torch's version and the CPU, and later processes load it from
there. A first build takes ~30 s on 2 cores. Where the build fails (no compiler, no Python
headers, ...) `cpu_kernels()` logs why once and returns None, and the engine keeps the torch path:
outputs are the same up to float rounding, only slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = tuple(SOURCE_DIR / name for name in ("bindings.cpp", "paged_decode_attention.cpp", "decoder_layer_ops.cpp"))
HEADERS = (SOURCE_DIR / "kernels.h", SOURCE_DIR / "vector_math.h")
CACHE_DIR_ENVIRONMENT_VARIABLE = "PROTOSERVE_KERNEL_CACHE_DIR"
# -ffp-contract=off: no fused multiply-adds, so elementwise results round as torch's ops round them.
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")
# torch's own libgomp is loaded first and carries the same soname, so the library shares torch's
# OpenMP runtime (one thread pool, the thread count torch was given).
LINK_FLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class CpuKernels:
    """The built library's entry points."""

    library: Any

    def paged_decode_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        key_slots: torch.Tensor,
        key_lengths: torch.Tensor,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """query [S, H, D], caches [slots, KV, D], key_slots [S, K] and key_lengths [S] (int64) ->
        [S, H, D]: each sequence's one query attends to its first key_lengths[s] keys (the last
        `sliding_window` of them when given). Raises RuntimeError on inconsistent shapes or slots."""
        return self.library.paged_decode_attention(
            query.contiguous(), key_cache, value_cache, key_slots, key_lengths, float(scale), sliding_window or 0
        )

    def rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Llama's RMSNorm of hidden [rows, size] (unit column stride): weight * (x / sqrt(mean(x^2) + eps)),
        in float32 and rounded to the input's dtype before the weight, as transformers does."""
        return self.library.rms_norm(hidden, weight, float(epsilon))

    def add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, epsilon: float
    ) -> torch.Tensor:
        """hidden += delta (in place; hidden contiguous [rows, size], delta any layout of that shape),
        then `rms_norm(hidden)`."""
        return self.library.add_rms_norm(hidden, delta, weight, float(epsilon))

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [rows, 2 I] (gate columns, then up; any layout) -> silu(gate) * up, row-major [rows, I]."""
        return self.library.silu_mul(gate_up)

    def rotary_write_kv(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor:
        """qkv [T, (H + 2 KV) D] (q, then k, then v; unit column stride), cos and sin [T, D] ->
        query [T, H, D] with rotary embeddings applied; k (rotated) and v are written to the caches
        [slots, KV, D] at slot_mapping [T]. Raises RuntimeError on inconsistent shapes or slots."""
        return self.library.rotary_write_kv(qkv, cos, sin, key_cache, value_cache, slot_mapping, num_heads)


_lock = threading.Lock()
_kernels: CpuKernels | None = None
_failure: str | None = None


def cpu_kernels() -> CpuKernels | None:
    """The kernels, built or loaded on the first call; None (logged once) where they cannot be built."""
    global _kernels, _failure
    with _lock:
        if _kernels is None and _failure is None:
            try:
                _kernels = CpuKernels(_build())
            except Exception as error:  # the compiler's or loader's error, whatever its type
                _failure = f"{type(error).__name__}: {_summary(str(error))}"
                logger.warning("CPU kernels not built, the engine keeps torch's ops (slower): %s", _failure)
        return _kernels


def _summary(message: str, limit: int = 1200) -> str:
    """The lines of a build error that say what failed (the compiler's `error:` lines first), cut to `limit`."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    chosen = list(dict.fromkeys(errors[:5] + lines[-2:])) if errors else lines[-5:]
    return "\n".join(chosen)[-limit:]


def build_failure() -> str | None:
    """Why the last build failed, or None."""
    return _failure


def kernel_cache_dir() -> Path:
    """`$PROTOSERVE_KERNEL_CACHE_DIR` when set, else `~/.cache/protoserve/kernels`."""
    configured = os.environ.get(CACHE_DIR_ENVIRONMENT_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "protoserve" / "kernels"


def library_name() -> str:
    """A name that changes with anything that changes the built library: source, flags, torch, CPU."""
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    for part in (repr(COMPILE_FLAGS + LINK_FLAGS).encode(), torch.__version__.encode()):
        digest.update(part)
    digest.update(_cpu_identity().encode())
    return f"protoserve_cpu_kernels_{digest.hexdigest()[:16]}"


def _cpu_identity() -> str:
    """The CPU's model and feature flags: `-march=native` builds for exactly these."""
    identity = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags", "Features")):
                    identity += line
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        pass
    return identity


def _build() -> Any:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    name = library_name()
    build_directory = kernel_cache_dir() / name
    build_directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(source) for source in SOURCES],
        extra_include_paths=[str(SOURCE_DIR)],
        extra_cflags=list(COMPILE_FLAGS),
        extra_ldflags=list(LINK_FLAGS),
        build_directory=str(build_directory),
        verbose=False,
    )


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the `ninja` package's binary is not there when the venv is not active."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
