"""Every sampling parameter changes the chosen tokens as it should, row by row."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
from protoserve.server.engine.api import SamplingParams
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.engine.sampler import (
    Sampler,
    SamplingRow,
    _blocked_end_tokens,
    validate_sampling_params_for_vocab,
)

VOCAB = 16
EOS = 15


def make_row(
    params: SamplingParams,
    *,
    seed: int | None = None,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    constraint: object | None = None,
    eos: frozenset[int] = frozenset({EOS}),
) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, generator, list(prompt), list(output), constraint, eos)  # type: ignore[arg-type]


def ramp_logits(rows: int = 1) -> torch.Tensor:
    """Token i has logit i/2 (EOS the most likely), the same for every row."""
    return (torch.arange(VOCAB, dtype=torch.float32) / 2).repeat(rows, 1)


def draw_many(params: SamplingParams, logits: torch.Tensor, count: int = 400, **row_options: object) -> Counter[int]:
    sampler = Sampler()
    rows = [make_row(params, **row_options) for _ in range(count)]  # type: ignore[arg-type]
    return Counter(sampler.sample(logits.repeat(count, 1), rows).token_ids)


def test_greedy_is_argmax_and_does_not_modify_logits() -> None:
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    result = Sampler().sample(logits, [make_row(SamplingParams(temperature=0.0)) for _ in range(4)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 4
    assert torch.equal(logits, before)


def test_padding_columns_are_never_chosen() -> None:
    logits = torch.zeros(2, VOCAB + 4)
    logits[:, VOCAB:] = 100.0
    sampler = Sampler(vocab_size=VOCAB)
    greedy = sampler.sample(logits, [make_row(SamplingParams(temperature=0.0)) for _ in range(2)])
    sampled = sampler.sample(logits, [make_row(SamplingParams()) for _ in range(2)])
    assert all(token < VOCAB for token in greedy.token_ids + sampled.token_ids)


def test_top_k_keeps_exactly_the_k_most_likely() -> None:
    counts = draw_many(SamplingParams(top_k=3, temperature=5.0), ramp_logits()[:, :])
    assert set(counts) == {EOS, EOS - 1, EOS - 2}


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = draw_many(SamplingParams(top_p=0.7), logits, eos=frozenset())
    assert set(counts) == {0, 1}
    counts = draw_many(SamplingParams(top_p=0.85), logits, eos=frozenset())
    assert set(counts) == {0, 1, 2}


@pytest.mark.parametrize(("scale", "top_p"), [(0.02, 0.6), (0.002, 0.5), (0.0001, 0.9)])
def test_top_p_nucleus_of_any_width(scale: float, top_p: float) -> None:
    """Narrow, middling and nearly flat distributions over a large vocabulary (the nucleus fits in
    the first candidate stage, the second, or needs a full sort)."""
    vocab = 5000
    logits = (torch.randperm(vocab).float() * scale).unsqueeze(0)
    probs = logits[0].softmax(dim=-1)
    ordered = probs.sort(descending=True)
    mass_before = ordered.values.cumsum(dim=0) - ordered.values
    nucleus = set(ordered.indices[mass_before < top_p].tolist())
    counts = draw_many(SamplingParams(top_p=top_p), logits, count=300, eos=frozenset())
    assert set(counts) <= nucleus
    assert len(counts) > min(len(nucleus), 300) // 3


def test_min_p_drops_tokens_below_the_fraction_of_the_best() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = draw_many(SamplingParams(min_p=0.5), logits, eos=frozenset())
    assert set(counts) == {0, 1}


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.4]]))
    cold = draw_many(SamplingParams(temperature=0.1), logits, count=300, eos=frozenset())
    hot = draw_many(SamplingParams(temperature=50.0), logits, count=300, eos=frozenset())
    assert cold[0] > 290
    assert 100 < hot[1] < 200


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, 1e-45])
def test_a_vanishing_temperature_is_greedy(temperature: float) -> None:
    """Logits divided by 1e-38 overflow float32: every probability became NaN and the last token won."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    rows = [make_row(SamplingParams(temperature=temperature, logprobs=True), seed=row) for row in range(3)]
    result = Sampler().sample(logits.clone(), rows)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert all(logprob is not None and math.isfinite(logprob.logprob) for logprob in result.logprobs)


def test_logit_bias_forces_and_forbids() -> None:
    forced = draw_many(SamplingParams(logit_bias={3: 100.0}), ramp_logits(), count=50)
    assert set(forced) == {3}
    forbidden = Sampler().sample(ramp_logits(), [make_row(SamplingParams(temperature=0.0, logit_bias={EOS: -100.0}))])
    assert forbidden.token_ids == [EOS - 1]


def test_repetition_penalty_uses_prompt_and_output_with_hf_semantics() -> None:
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=True)
    row = make_row(params, prompt=[0], output=[2], eos=frozenset())
    result = Sampler().sample(logits, [row])
    assert result.token_ids == [1]  # 2.0 / 2 = 1.0 < 1.5
    expected = torch.tensor([1.0, 1.5, -2.0, -1.2]).log_softmax(dim=-1)
    assert result.logprobs[0] is not None
    assert result.logprobs[0].logprob == pytest.approx(expected[1].item(), abs=1e-5)


def test_presence_and_frequency_penalties_lower_repeated_output_tokens() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    frequency = SamplingParams(temperature=0.0, frequency_penalty=0.3, top_logprobs=3, logprobs=True)
    result = Sampler().sample(logits, [make_row(frequency, output=[0, 0], prompt=[1], eos=frozenset())])
    assert result.token_ids == [1]  # 3.0 - 2 * 0.3 = 2.4 < 2.5; prompt tokens are not penalized
    presence = SamplingParams(temperature=0.0, presence_penalty=0.6)
    assert Sampler().sample(logits, [make_row(presence, output=[0], eos=frozenset())]).token_ids == [1]
    # Presence counts output tokens only, and once however often they occur.
    assert Sampler().sample(logits, [make_row(presence, prompt=[0], eos=frozenset())]).token_ids == [0]
    weak_presence = SamplingParams(temperature=0.0, presence_penalty=0.4)
    assert Sampler().sample(logits, [make_row(weak_presence, output=[0] * 5, eos=frozenset())]).token_ids == [0]


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(EOS - 1,))
    sampler = Sampler()
    assert sampler.sample(ramp_logits(), [make_row(params, output=[1])]).token_ids == [EOS - 2]
    assert sampler.sample(ramp_logits(), [make_row(params, output=[1, 2])]).token_ids == [EOS]


def test_ignore_eos_masks_every_eos_id() -> None:
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    row = make_row(params, eos=frozenset({EOS, EOS - 1}))
    assert Sampler().sample(ramp_logits(), [row]).token_ids == [EOS - 2]


def test_rows_do_not_influence_each_other() -> None:
    logits = ramp_logits(3)
    rows = [
        make_row(SamplingParams(temperature=0.0, logit_bias={0: 100.0})),
        make_row(SamplingParams(temperature=0.0)),
        make_row(SamplingParams(top_k=1, min_tokens=5)),
    ]
    assert Sampler().sample(logits, rows).token_ids == [0, EOS, EOS - 1]


class AllowOnly:
    """A constraint that allows a fixed set of tokens and is complete after `complete_after` tokens."""

    def __init__(self, allowed: set[int], complete_after: int = 1) -> None:
        self.allowed = allowed
        self.complete_after = complete_after
        self.accepted: list[int] = []

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[list(self.allowed)] = True
        return mask

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)

    def is_complete(self) -> bool:
        return len(self.accepted) >= self.complete_after


def test_constraint_masks_and_sees_the_chosen_token() -> None:
    constraint = AllowOnly({2, 5, EOS})
    result = Sampler().sample(ramp_logits(), [make_row(SamplingParams(temperature=0.0), constraint=constraint)])
    assert result.token_ids == [5]  # EOS is allowed by the mask but the constraint is not complete
    assert constraint.accepted == [5]
    result = Sampler().sample(ramp_logits(), [make_row(SamplingParams(temperature=0.0), constraint=constraint)])
    assert result.token_ids == [EOS]


def test_a_row_with_nothing_allowed_ends_with_eos() -> None:
    constraint = AllowOnly(set(), complete_after=0)
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    assert Sampler().sample(ramp_logits(), [make_row(params, constraint=constraint)]).token_ids == [EOS]


@pytest.mark.parametrize("blocked_rows", [[0], [0, 2, 3]], ids=["few rows blocked", "most rows blocked"])
def test_an_unconstrained_row_left_with_nothing_but_eos_gets_it_back(blocked_rows: list[int]) -> None:
    """ignore_eos on a row whose only finite logit is EOS: the row must still end, with EOS; the
    other rows (EOS blocked too, but other tokens left) take their best other token."""
    logits = ramp_logits(4)
    logits[0, :EOS] = float("-inf")
    rows = [make_row(SamplingParams(temperature=0.0, ignore_eos=index in blocked_rows)) for index in range(4)]
    chosen = Sampler().sample(logits, rows).token_ids
    assert chosen[0] == EOS
    for index in range(1, 4):
        assert chosen[index] == (EOS - 1 if index in blocked_rows else EOS), index


def test_constraint_mask_of_the_wrong_size_is_a_clear_error() -> None:
    class WrongSize(AllowOnly):
        def allowed_token_mask(self, vocab_size: int) -> torch.Tensor:
            return torch.ones(vocab_size + 1, dtype=torch.bool)

    with pytest.raises(ValueError, match="mask of 17 tokens"):
        Sampler().sample(ramp_logits(), [make_row(SamplingParams(), constraint=WrongSize({1}))])


def test_bad_shapes_and_out_of_vocabulary_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="do not match"):
        Sampler().sample(torch.zeros(2, VOCAB), [make_row(SamplingParams())])
    with pytest.raises(InvalidRequestError, match="logit_bias names token id 99"):
        validate_sampling_params_for_vocab(SamplingParams(logit_bias={99: 1.0}), VOCAB)
    with pytest.raises(InvalidRequestError, match="stop_token_ids names token id -1"):
        validate_sampling_params_for_vocab(SamplingParams(stop_token_ids=(-1,)), VOCAB)
    with pytest.raises(InvalidRequestError, match="top_logprobs"):
        validate_sampling_params_for_vocab(SamplingParams(logprobs=True, top_logprobs=21), VOCAB)
    with pytest.raises(InvalidRequestError, match="finite"):
        validate_sampling_params_for_vocab(SamplingParams(logit_bias={3: float("nan")}), VOCAB)
    with pytest.raises(InvalidRequestError, match="non-empty"):
        validate_sampling_params_for_vocab(SamplingParams(stop=("ok", "")), VOCAB)
    validate_sampling_params_for_vocab(SamplingParams(logit_bias={3: 1.0}, stop_token_ids=(4,), stop=("x",)), VOCAB)


def test_empty_batch() -> None:
    assert Sampler().sample(torch.zeros(0, VOCAB), []).token_ids == []


def test_unseeded_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = draw_many(replace(SamplingParams(), temperature=1.0), logits, count=2000, eos=frozenset())
    assert counts[0] / 2000 == pytest.approx(0.7, abs=0.05)
    assert counts[2] / 2000 == pytest.approx(0.1, abs=0.03)


def test_the_greedy_shortcut_equals_the_full_path() -> None:
    """Greedy rows with only min_tokens/ignore_eos blocking skip the copy of the logits; on random
    logits with ties, blocked maxima and -inf rows they choose what the full path chooses."""
    generator = torch.Generator().manual_seed(7)
    sampler = Sampler()
    redone = 0
    for trial in range(200):
        logits = torch.randint(0, 4, (6, VOCAB), generator=generator).float()  # many ties
        if trial % 5 == 0:
            logits[trial % 6] = float("-inf")
            logits[trial % 6, EOS] = 1.0
        rows = [
            make_row(
                SamplingParams(
                    temperature=0.0,
                    ignore_eos=bool(torch.randint(0, 2, (1,), generator=generator)),
                    min_tokens=int(torch.randint(0, 2, (1,), generator=generator)),
                    stop_token_ids=(int(torch.randint(0, VOCAB, (1,), generator=generator)),),
                )
            )
            for _ in range(6)
        ]
        shortcut = sampler.sample(logits, rows).token_ids
        full = sampler._process_and_choose(logits, rows, VOCAB).token_ids
        assert shortcut == full, trial
        plain = logits.argmax(dim=-1).tolist()
        redone += sum(1 for row, token_id in zip(rows, plain, strict=True) if token_id in _blocked_end_tokens(row))
    assert redone > 20  # the trials do reach rows whose first choice is blocked
