"""Faster small-batch linear layers on CPU: y = x W^T computed as (W x^T)^T when x has few rows.

A decode step multiplies a handful of rows (one per running sequence) by every weight matrix. In
the `x @ W^T` form the BLAS library splits that handful of rows over its threads; in the
`W @ x^T` form it splits the weight's rows, which keeps every thread busy. Measured on a 2-core
AMD EPYC with MKL and SmolLM2-135M's shapes: 15-25% less time for the model's linears at 4-16
rows with 2 threads, about 10% at 32-128, the same with 1 thread; past 128 rows (prefill) and
past 32 rows for a vocabulary-wide LM head the usual form is kept. Results equal the usual form
up to float rounding (the sums run in another order).

One row (a single running sequence) is the memory-bound case: MKL's matrix-vector product reads
the weights on one thread (~15 GB/s here whatever the thread count), while a two-column
`W @ [x, x]^T` product streams them on every thread (~22 GB/s with 2 threads). The row is doubled
and one column kept: SmolLM2-135M's linears and LM head at one row, 36 ms -> 27 ms per step with
2 threads. With one thread the matrix-vector product stays (doubling would only add work).

`use_row_split_linears(model)` switches the plain `nn.Linear` layers of a model that lives on the
CPU in float32; quantized or other subclasses keep their own forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Row counts (tokens in the step) for which the W @ x^T form is used: up to 128 rows for the
# layers' weights, up to 32 for a wide one (an LM head's vocabulary rows), where it stops paying
# earlier (measured with SmolLM2-135M's fused shapes, 2 threads: 10% less time at 32-128 rows for
# the layers; for the 49152-row head 8% less at 32 rows, 25% more at 64).
MIN_ROWS, MAX_ROWS, MAX_ROWS_WIDE = 2, 128, 32
WIDE_OUTPUT = 8192


def small_batch_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, contiguous: bool = True
) -> torch.Tensor:
    """`F.linear(hidden, weight, bias)`, as W @ x^T for 2..128 rows of a float32 CPU weight (2..32
    for a wide one), and for one row, doubled, when torch runs more than one thread; else the usual
    F.linear. With `contiguous=False` the W @ x^T result comes back as a transposed view, without
    the copy into row-major order (for a caller that only feeds it to elementwise ops or slices)."""
    rows = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or hidden.dtype != weight.dtype
        or not (
            MIN_ROWS <= rows <= (MAX_ROWS_WIDE if weight.shape[0] > WIDE_OUTPUT else MAX_ROWS)
            or (rows == 1 and torch.get_num_threads() > 1)
        )
    ):
        return F.linear(hidden, weight, bias)
    flat = hidden.reshape(rows, hidden.shape[-1])
    if rows == 1:
        output = torch.mm(weight, torch.cat((flat, flat)).t())[:, :1].t()
    else:
        output = torch.mm(weight, flat.t()).t()
    if bias is not None:
        output = output + bias
    if not contiguous and hidden.dim() == 2:
        return output
    return output.contiguous().view(*hidden.shape[:-1], weight.shape[0])


def row_split_linear(module: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """`module(hidden)` through `small_batch_linear`."""
    return small_batch_linear(hidden, module.weight, module.bias)


def use_row_split_linears(model: torch.nn.Module) -> int:
    """Route the model's plain float32 CPU `nn.Linear` layers through `row_split_linear`; returns
    how many were switched (0 on other devices and dtypes)."""
    switched = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            continue
        module.forward = _bound(module)  # type: ignore[method-assign,assignment]
        switched += 1
    return switched


def _bound(module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return row_split_linear(module, hidden)

    return forward
