"""Seeded sampling is reproducible whatever the batch; logprobs are a proper distribution."""

from __future__ import annotations

import math

import pytest
import torch
from protoserve.server.engine.api import SamplingParams
from protoserve.server.engine.sampler import Sampler, SamplingRow

from .test_sampler import EOS, VOCAB, make_row


def seeded_run(seed: int, steps: int, batch_position: int, batch_size: int, params: SamplingParams) -> list[int]:
    """Sample `steps` tokens for one seeded row placed among unseeded and differently seeded rows."""
    torch.manual_seed(1234 + batch_position + batch_size)  # unseeded rows see different noise each run
    logits_source = torch.Generator().manual_seed(7)
    row_generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    sampler = Sampler()
    for _ in range(steps):
        target_logits = torch.randn(1, VOCAB, generator=logits_source)
        logits = torch.randn(batch_size, VOCAB)
        logits[batch_position] = target_logits
        rows = [
            make_row(SamplingParams(temperature=0.7, top_k=5), seed=index * 31 + batch_size)
            if index % 2
            else make_row(SamplingParams(top_p=0.9))
            for index in range(batch_size)
        ]
        rows[batch_position] = make_row(params)
        rows[batch_position].generator = row_generator
        rows[batch_position].output_token_ids = list(tokens)
        tokens.append(sampler.sample(logits, rows).token_ids[batch_position])
    return tokens


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, top_k=8, min_p=0.01, presence_penalty=0.5)],
)
def test_same_seed_same_tokens_whatever_the_batch(params: SamplingParams) -> None:
    alone = seeded_run(seed=42, steps=12, batch_position=0, batch_size=1, params=params)
    assert seeded_run(seed=42, steps=12, batch_position=3, batch_size=5, params=params) == alone
    assert seeded_run(seed=42, steps=12, batch_position=0, batch_size=4, params=params) == alone
    assert seeded_run(seed=43, steps=12, batch_position=0, batch_size=1, params=params) != alone


def test_logprobs_are_a_distribution_and_top_is_ordered() -> None:
    logits = torch.randn(3, VOCAB) * 3
    params = SamplingParams(temperature=0.5, logprobs=True, top_logprobs=VOCAB)
    rows = [make_row(params, seed=1), make_row(SamplingParams()), make_row(params, seed=2)]
    result = Sampler().sample(logits, rows)
    assert result.logprobs[1] is None
    for position in (0, 2):
        logprob = result.logprobs[position]
        assert logprob is not None
        assert logprob.token_id == result.token_ids[position]
        values = [top.logprob for top in logprob.top]
        assert len(values) == VOCAB
        assert values == sorted(values, reverse=True)
        assert math.fsum(math.exp(v) for v in values) == pytest.approx(1.0, abs=1e-5)
        assert {top.token_id for top in logprob.top} == set(range(VOCAB))
        by_id = {top.token_id: top.logprob for top in logprob.top}
        assert logprob.logprob == pytest.approx(by_id[logprob.token_id])
        expected = (logits[position] / 0.5).log_softmax(dim=-1)
        assert logprob.logprob == pytest.approx(expected[logprob.token_id].item(), abs=1e-5)


def test_greedy_logprobs_use_temperature_one_and_respect_top_logprobs() -> None:
    logits = torch.randn(1, VOCAB)
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)
    logprob = Sampler().sample(logits, [make_row(params)]).logprobs[0]
    assert logprob is not None
    expected = logits[0].log_softmax(dim=-1)
    assert logprob.token_id == int(expected.argmax())
    assert logprob.logprob == pytest.approx(expected.max().item(), abs=1e-5)
    assert [top.token_id for top in logprob.top] == expected.topk(3).indices.tolist()


def test_logprobs_without_alternatives_and_after_masks() -> None:
    logits = torch.zeros(1, VOCAB)
    params = SamplingParams(temperature=0.0, logprobs=True, ignore_eos=True)
    logprob = Sampler().sample(logits, [make_row(params)]).logprobs[0]
    assert logprob is not None
    assert logprob.top == ()
    assert logprob.token_id != EOS
    assert logprob.logprob == pytest.approx(-math.log(VOCAB - 1), abs=1e-5)  # EOS is masked out


def test_masked_tokens_are_not_offered_as_alternatives() -> None:
    params = SamplingParams(logprobs=True, top_logprobs=VOCAB, logit_bias={0: -math.inf}, min_tokens=1)
    logprob = Sampler().sample(torch.zeros(1, VOCAB), [make_row(params)]).logprobs[0]
    assert logprob is not None
    assert {top.token_id for top in logprob.top} == set(range(1, VOCAB - 1))  # neither 0 nor EOS
    assert all(math.isfinite(top.logprob) for top in logprob.top)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_on_cuda_seeded_rows_ignore_the_batch_and_greedy_is_argmax(generator_device: str) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=10, repetition_penalty=1.2, logprobs=True)
    logits = torch.randn(4, VOCAB, device="cuda")

    def seeded_row() -> SamplingRow:
        generator = torch.Generator(device=generator_device).manual_seed(5)
        return SamplingRow(params, generator, [1, 2], [3], None, frozenset({EOS}))

    alone = Sampler().sample(logits[2:3], [seeded_row()])
    others = [make_row(SamplingParams(temperature=0.0)), make_row(SamplingParams(min_p=0.1)), seeded_row()]
    others.append(make_row(SamplingParams(presence_penalty=1.0, logit_bias={1: 2.0}), output=[1, 1]))
    batched = Sampler().sample(logits, others)
    assert batched.token_ids[2] == alone.token_ids[0]
    assert batched.token_ids[0] == int(logits[0].argmax())
    assert alone.logprobs[0] is not None and batched.logprobs[2] is not None
    assert batched.logprobs[2].logprob == pytest.approx(alone.logprobs[0].logprob, abs=1e-5)
