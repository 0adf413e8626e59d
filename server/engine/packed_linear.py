"""oneDNN-packed weights for the lean forward's matrix products on CPU, where they measure faster.

Which library multiplies a few rows by a float32 weight fastest depends on the CPU. oneDNN can
reorder a weight once into the blocked layout its AVX-512 kernels stream best; on a 2-core
AMD EPYC (Zen 5, AVX-512) the SmolLM2-135M products of a decode step then take half MKL's time:
all layers' products at 16 rows 16 ms against 35 ms for MKL's best form (`cpu_linear`), at 64
rows 40 against 85, the vocabulary-wide LM head at 16 rows 3.7 against 10.8 ms. On an AVX2 host
of the same family the packed form gave nothing. So nothing is assumed: `measure_packed_plan`
times both forms over the model's own weights at a few row counts, on the thread (and thread
count) that runs the engine, and `LinearProduct` picks per step by the row count. The timing
takes ~3 s for SmolLM2-135M on 2 cores, once per process and set of weight shapes; the server's
warm-up request (before the server reports SERVING) pays it.

The packed copy is extra memory (the dense weights stay: transformers' own forward and
`model.generate` use them), so weights are packed only when the plan uses the packed form at
some row count. Results equal the dense products up to float rounding (sums in another order).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from protoserve.server.engine.cpu_linear import small_batch_linear

logger = logging.getLogger(__name__)

# Row counts (tokens in a step) at which the two forms are timed; a step uses the choice of the
# smallest bucket that holds its rows (the largest past the end).
ROW_BUCKETS = (1, 4, 16, 64, 256)
# oneDNN's reorder takes the expected row count as a hint; 16 served 1-256 rows best here.
PACKING_ROW_HINT = 16
# Each form is timed in alternation with the other (after one warm-up pass each), at least
# MIN_TIMED_PASSES times and until MIN_TIMED_SECONDS have passed; each form's fastest pass counts.
MIN_TIMED_PASSES = 3
MIN_TIMED_SECONDS = 0.15


@dataclass(frozen=True)
class PackedPlan:
    """For each of ROW_BUCKETS, whether the packed form is used at that many rows."""

    use_packed: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.use_packed) != len(ROW_BUCKETS):
            raise ValueError(f"a plan has one choice per bucket {ROW_BUCKETS}")

    @classmethod
    def dense_only(cls) -> PackedPlan:
        return cls((False,) * len(ROW_BUCKETS))

    @classmethod
    def packed_only(cls) -> PackedPlan:
        return cls((True,) * len(ROW_BUCKETS))

    @property
    def packs_anything(self) -> bool:
        return any(self.use_packed)

    def packed_at(self, rows: int) -> bool:
        for bucket, choice in zip(ROW_BUCKETS, self.use_packed, strict=True):
            if rows <= bucket:
                return choice
        return self.use_packed[-1]


def packing_supported(weight: torch.Tensor) -> bool:
    """True when `weight` can be packed: float32 on the CPU, with oneDNN in this torch build."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A oneDNN copy of `weight` [out, in] in the layout its linear kernels read best."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_ROW_HINT)


def packed_linear(hidden: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(hidden, weight, bias)` [rows, in] -> [rows, out] through the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(hidden, packed, bias, "none", [], "")


class LinearProduct:
    """y = x W^T + b for one weight: the packed form at the row counts where the plan says so,
    else `small_batch_linear`. Inputs are 2-d [rows, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.plan = PackedPlan.dense_only()

    def apply_plan(self, plan: PackedPlan) -> None:
        """Pack (or drop the packed copy) as `plan` needs; a weight that cannot be packed stays dense."""
        if plan.packs_anything and packing_supported(self.weight):
            if self.packed is None:
                self.packed = pack_weight(self.weight)
            self.plan = plan
        else:
            self.packed = None
            self.plan = PackedPlan.dense_only()

    def __call__(self, hidden: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
        if self.packed is not None and self.plan.packed_at(hidden.shape[0]):
            return packed_linear(hidden, self.packed, self.bias)
        return small_batch_linear(hidden, self.weight, self.bias, contiguous=contiguous)


def measure_packed_plan(products: Sequence[LinearProduct]) -> PackedPlan:
    """Time all `products` in sequence (a step's worth of weights) in the dense and the packed
    form at each of ROW_BUCKETS, with random inputs, on the calling thread; the packed form wins
    a bucket when it is faster there. Dense-only when nothing can be packed, or when oneDNN fails
    on this machine (logged: the engine then runs as if packing did not exist). The packed copies
    made for the timing stay on the products, so that `apply_plan` keeps them instead of packing
    again (or drops them for a dense-only plan)."""
    packable = [product for product in products if packing_supported(product.weight)]
    if not packable:
        return PackedPlan.dense_only()
    try:
        return _measure(packable)
    except (RuntimeError, NotImplementedError) as error:
        logger.warning("oneDNN-packed weights unavailable here, keeping dense products: %s", error)
        for product in packable:
            product.packed = None
        return PackedPlan.dense_only()


def _measure(packable: Sequence[LinearProduct]) -> PackedPlan:
    packed = []
    for product in packable:
        if product.packed is None:
            product.packed = pack_weight(product.weight)
        packed.append(product.packed)
    widths = {product.weight.shape[1] for product in packable}
    choices = []
    with torch.inference_mode():
        for rows in ROW_BUCKETS:
            inputs = {width: torch.randn(rows, width, dtype=torch.float32) for width in widths}
            packed_seconds, dense_seconds = _fastest_seconds(
                partial(_packed_pass, packable, packed, inputs), partial(_dense_pass, packable, inputs)
            )
            choices.append(packed_seconds < dense_seconds)
    return PackedPlan(tuple(choices))


def _dense_pass(products: Sequence[LinearProduct], inputs: dict[int, torch.Tensor]) -> None:
    for product in products:
        small_batch_linear(inputs[product.weight.shape[1]], product.weight, product.bias, contiguous=False)


def _packed_pass(
    products: Sequence[LinearProduct], packed: Sequence[torch.Tensor], inputs: dict[int, torch.Tensor]
) -> None:
    for product, weight in zip(products, packed, strict=True):
        packed_linear(inputs[product.weight.shape[1]], weight, product.bias)


def cached_packed_plan(products: Sequence[LinearProduct]) -> PackedPlan:
    """`measure_packed_plan`, once per process for a set of weight shapes and a thread count (the
    weights' values do not change the timings; a test process builds many engines on one model)."""
    key = (
        tuple((tuple(product.weight.shape), product.bias is not None) for product in products),
        torch.get_num_threads(),
    )
    plan = _measured_plans.get(key)
    if plan is None:
        plan = _measured_plans[key] = measure_packed_plan(products)
    return plan


_measured_plans: dict[object, PackedPlan] = {}


def _fastest_seconds(*runs: Callable[[], None]) -> list[float]:
    """Each run's fastest time, timed in turns (so that a slow spell of the machine hits all)."""
    for run in runs:
        run()  # warm-up: first-touch pages, kernel selection
    best = [float("inf")] * len(runs)
    passes, started = 0, time.perf_counter()
    while passes < MIN_TIMED_PASSES or time.perf_counter() - started < MIN_TIMED_SECONDS:
        for index, run in enumerate(runs):
            begun = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - begun)
        passes += 1
    return best
