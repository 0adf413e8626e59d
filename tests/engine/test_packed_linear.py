"""oneDNN-packed products: plans pick a form per row count, both forms give F.linear's results,
the plan is measured once per process and shape set, and the engine's greedy output still equals
`model.generate` when every product goes through the packed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from protoserve.server.engine import packed_linear
from protoserve.server.engine.fast_decoder import FastDecoderForward
from protoserve.server.engine.packed_linear import (
    ROW_BUCKETS,
    LinearProduct,
    PackedPlan,
    cached_packed_plan,
    measure_packed_plan,
    packing_supported,
)

from .engine_fixtures import (
    build_model,
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    run_until_done,
    submit,
    tiny_llama_config,
)

PACKING = packing_supported(torch.zeros(2, 2))
needs_packing = pytest.mark.skipif(not PACKING, reason="this torch build has no oneDNN")


def test_plans_choose_by_the_smallest_bucket_that_holds_the_rows() -> None:
    plan = PackedPlan((False, True, True, False, True))
    assert [plan.packed_at(rows) for rows in (1, 2, 4, 5, 16, 17, 64, 65, 256, 5000)] == [
        False, True, True, True, True, False, False, True, True, True,
    ]  # fmt: skip
    assert not PackedPlan.dense_only().packs_anything and PackedPlan.packed_only().packs_anything
    with pytest.raises(ValueError, match="one choice per bucket"):
        PackedPlan((True,))


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 16, 70, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_both_forms_equal_f_linear(rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    hidden = torch.randn(rows, 40, generator=generator)
    expected = F.linear(hidden, weight, bias)
    product = LinearProduct(weight, bias)
    for plan in (PackedPlan.packed_only(), PackedPlan.dense_only()):
        product.apply_plan(plan)
        assert (product.packed is not None) == plan.packs_anything
        torch.testing.assert_close(product(hidden), expected, rtol=1e-5, atol=1e-5)


def test_weights_that_cannot_be_packed_stay_dense() -> None:
    product = LinearProduct(torch.randn(8, 4, dtype=torch.float64), None)
    product.apply_plan(PackedPlan.packed_only())
    assert product.packed is None and product.plan == PackedPlan.dense_only()
    hidden = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(product(hidden), hidden @ product.weight.T)
    assert measure_packed_plan([product]) == PackedPlan.dense_only()


@needs_packing
def test_measuring_times_every_bucket_and_is_cached_per_shapes_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    products = [LinearProduct(torch.randn(24, 16), None), LinearProduct(torch.randn(16, 24), torch.randn(16))]
    timed: list[int] = []
    real_timer = packed_linear._fastest_seconds
    monkeypatch.setattr(packed_linear, "_fastest_seconds", lambda *runs: timed.append(1) or real_timer(*runs))
    monkeypatch.setattr(packed_linear, "_measured_plans", {})
    plan = cached_packed_plan(products)
    assert len(plan.use_packed) == len(ROW_BUCKETS) and len(timed) == len(ROW_BUCKETS)
    same_shapes = [LinearProduct(torch.randn(24, 16), None), LinearProduct(torch.randn(16, 24), torch.randn(16))]
    assert cached_packed_plan(same_shapes) is plan and len(timed) == len(ROW_BUCKETS)
    cached_packed_plan([LinearProduct(torch.randn(24, 16), None)])
    assert len(timed) == 2 * len(ROW_BUCKETS)


def test_the_first_forward_measures_and_applies_a_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_linear, "_measured_plans", {})
    under_test = make_engine(build_model(tiny_llama_config()))
    forward = under_test.engine.runner.fast_forward
    assert isinstance(forward, FastDecoderForward) and forward.plan is None
    submit(under_test.engine, random_prompts(2, 4, 8), greedy(2))
    run_until_done(under_test.engine)
    assert forward.plan is not None
    assert len(forward.products) == 4 * len(forward.layers) + 1
    assert all(product.plan == (forward.plan if PACKING else PackedPlan.dense_only()) for product in forward.products)


@needs_packing
@pytest.mark.parametrize("plan", [PackedPlan.packed_only(), PackedPlan((True, False, True, False, True))])
def test_greedy_output_equals_generate_through_packed_products(plan: PackedPlan) -> None:
    under_test = make_engine(build_model(tiny_llama_config()))
    forward = under_test.engine.runner.fast_forward
    assert isinstance(forward, FastDecoderForward)
    forward.set_plan(plan)
    assert all(product.packed is not None for product in forward.products)
    prompts = random_prompts(16, 1, 40, seed=5)
    ids = submit(under_test.engine, prompts, greedy(10))
    results = run_until_done(under_test.engine)
    for request_id, prompt in zip(ids, prompts, strict=True):
        assert results[request_id].token_ids[0] == reference_greedy(under_test.reference, prompt, 10), request_id


def test_packed_weights_off_keeps_the_dense_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_linear, "_measured_plans", {})
    under_test = make_engine(build_model(tiny_llama_config()), packed_weights=False)
    forward = under_test.engine.runner.fast_forward
    assert isinstance(forward, FastDecoderForward) and forward.plan == PackedPlan.dense_only()
    prompts = random_prompts(3, 4, 12, seed=2)
    ids = submit(under_test.engine, prompts, greedy(4))
    results = run_until_done(under_test.engine)
    assert packed_linear._measured_plans == {}, "nothing was timed"
    assert all(product.packed is None for product in forward.products)
    for request_id, prompt in zip(ids, prompts, strict=True):
        assert results[request_id].token_ids[0] == reference_greedy(under_test.reference, prompt, 4), request_id


def test_a_failing_onednn_leaves_the_products_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr(packed_linear, "packing_supported", lambda weight: True)
    monkeypatch.setattr(packed_linear, "pack_weight", fail)
    product = LinearProduct(torch.randn(8, 4), None)
    assert measure_packed_plan([product]) == PackedPlan.dense_only() and product.packed is None


@needs_packing
def test_the_copies_packed_for_timing_are_kept_not_packed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    packings: list[int] = []
    real_pack = packed_linear.pack_weight
    monkeypatch.setattr(packed_linear, "pack_weight", lambda weight: packings.append(1) or real_pack(weight))
    products = [LinearProduct(torch.randn(24, 16), None), LinearProduct(torch.randn(16, 24), None)]
    measure_packed_plan(products)
    for product in products:
        product.apply_plan(PackedPlan.packed_only())
    assert len(packings) == 2 and all(product.packed is not None for product in products)
    for product in products:
        product.apply_plan(PackedPlan.dense_only())
    assert all(product.packed is None for product in products)
