"""Speculative decoding with drafts looked up in the sequence: the lookup itself, and that the
engine's output with drafts equals its output without them (token ids, text, finish reasons and
usage) for every way a request can end, while taking fewer steps when the drafts are right."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from protoserve.server.engine.api import EngineConfig, EngineRequest, SamplingParams, TokenLogprob
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.loader import loaded_from_model
from protoserve.server.engine.ngram_drafts import LOOKUP_WINDOW, propose_draft
from protoserve.server.engine.sampler import SampleResult, SamplingRow

from .engine_fixtures import (
    EOS_TOKEN_ID,
    Collected,
    build_model,
    greedy,
    run_until_done,
    tiny_llama_config,
    word_tokenizer,
)

# ----- the lookup -----


def test_the_latest_occurrence_of_the_longest_ending_gives_the_draft() -> None:
    #            0  1  2  3  4  5  6  7  8  9 10
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 7, 1, 2, 3]
    assert propose_draft(tokens, 2) == [8, 7]  # "1 2 3" last seen at 4, followed by 8 7
    assert propose_draft(tokens, 10) == [8, 7, 1, 2, 3]  # never past the end


def test_shorter_endings_are_tried_when_longer_ones_never_occurred() -> None:
    assert propose_draft([5, 6, 4, 7, 6], 3) == [4, 7, 6]  # "7 6" and "4 7 6" occur once; "6" at 1
    assert propose_draft([5, 6, 7, 8], 3) == []  # nothing repeats
    assert propose_draft([4], 3) == []
    assert propose_draft([1, 2, 1, 2], 0) == []


def test_the_lookup_stays_within_its_window() -> None:
    far = [7, 8, 9] + list(range(100, 100 + LOOKUP_WINDOW)) + [7, 8]
    assert propose_draft(far, 2) == []


# ----- the engine, with a scripted sampler -----


class ScriptedSampler:
    """Chooses for each row the script's token at that row's output length, so a sequence's
    output is the script whatever the model computes, with drafts or without."""

    def __init__(self, script: Sequence[int]) -> None:
        self.script = list(script)
        self.rows_seen = 0

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        assert logits.shape[0] == len(rows)
        self.rows_seen += len(rows)
        tokens = [self.script[len(row.output_token_ids)] for row in rows]
        logprobs = [
            TokenLogprob(token, 0.0) if row.params.logprobs else None for row, token in zip(rows, tokens, strict=True)
        ]
        return SampleResult(tokens, logprobs)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return build_model(tiny_llama_config())


def run_scripted(
    model: torch.nn.Module,
    prompt: list[int],
    script: list[int],
    params: SamplingParams,
    speculative_tokens: int,
    kv_cache_bytes: int = 1 << 20,
) -> tuple[Collected, LLMEngine]:
    engine = LLMEngine(
        loaded_from_model(copy.deepcopy(model), word_tokenizer()),
        EngineConfig(kv_cache_bytes=kv_cache_bytes, block_size=4, speculative_tokens=speculative_tokens),
        sampler=ScriptedSampler(script),
        sampling_row_type=SamplingRow,
    )
    engine.add_request(EngineRequest("s", tuple(prompt), params))
    return run_until_done(engine)["s"], engine


PATTERN_PROMPT = [5, 6, 7, 5, 6]
PATTERN_SCRIPT = [7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 9, 9, 9, 9]


def assert_same(with_drafts: Collected, without: Collected) -> None:
    assert dict(with_drafts.token_ids) == dict(without.token_ids)
    assert dict(with_drafts.text) == dict(without.text)
    assert with_drafts.finish_reasons == without.finish_reasons
    assert with_drafts.usage == without.usage


def test_right_drafts_give_the_same_output_in_fewer_steps(tiny_model: torch.nn.Module) -> None:
    without, plain = run_scripted(tiny_model, PATTERN_PROMPT, PATTERN_SCRIPT, greedy(16), speculative_tokens=0)
    with_drafts, engine = run_scripted(tiny_model, PATTERN_PROMPT, PATTERN_SCRIPT, greedy(16), speculative_tokens=3)
    assert_same(with_drafts, without)
    assert without.token_ids[0] == PATTERN_SCRIPT[:16]
    assert engine.scheduler.num_accepted_draft_tokens >= 9
    assert engine.steps < plain.steps - 5
    assert engine.stats().kv_blocks_used == 0  # everything freed, drafts' extra slots included


@pytest.mark.parametrize(
    ("label", "params"),
    [
        ("stop token inside accepted drafts", greedy(16, stop_token_ids=(6,))),
        ("stop string inside accepted drafts", greedy(16, stop=("w5 w6",))),
        ("eos inside accepted drafts", greedy(16)),
        ("eos ignored", greedy(16, ignore_eos=True)),
        ("max tokens shorter than the drafts", greedy(2)),
        ("min tokens masks nothing here", greedy(6, min_tokens=4)),
    ],
)
def test_every_ending_matches_plain_decoding(tiny_model: torch.nn.Module, label: str, params: SamplingParams) -> None:
    script = [7, 5, 6, EOS_TOKEN_ID, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5]
    if label != "stop token inside accepted drafts":
        script[3] = 7 if "eos" not in label else EOS_TOKEN_ID
    without, _ = run_scripted(tiny_model, PATTERN_PROMPT, script, params, speculative_tokens=0)
    with_drafts, engine = run_scripted(tiny_model, PATTERN_PROMPT, script, params, speculative_tokens=3)
    assert_same(with_drafts, without)
    assert with_drafts.finished
    assert engine.stats().kv_blocks_used == 0


def test_wrong_drafts_cost_nothing_but_rows(tiny_model: torch.nn.Module) -> None:
    # After every 5 the lookup proposes what followed the previous 5; the script never agrees.
    script = [5, 9, 5, 10, 5, 11, 5, 12, 5, 13, 5, 14]
    without, plain = run_scripted(tiny_model, PATTERN_PROMPT * 2, script, greedy(10), speculative_tokens=0)
    with_drafts, engine = run_scripted(tiny_model, PATTERN_PROMPT * 2, script, greedy(10), speculative_tokens=3)
    assert_same(with_drafts, without)
    assert engine.scheduler.num_draft_tokens > 0 and engine.scheduler.num_accepted_draft_tokens == 0
    assert engine.steps == plain.steps


def test_drafts_never_take_blocks_another_sequence_needs(tiny_model: torch.nn.Module) -> None:
    """A cache of exactly the request's 24 tokens (6 blocks of 4): drafts shrink to fit its end."""
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads, head dim 16, float32
    script = PATTERN_SCRIPT * 3
    params = greedy(24 - len(PATTERN_PROMPT))
    without, _ = run_scripted(tiny_model, PATTERN_PROMPT, script, params, 0, kv_cache_bytes=6 * 4 * bytes_per_token)
    with_drafts, _ = run_scripted(tiny_model, PATTERN_PROMPT, script, params, 3, kv_cache_bytes=6 * 4 * bytes_per_token)
    assert_same(with_drafts, without)


# ----- who gets drafts -----


def scripted_engine(model: torch.nn.Module, **config: object) -> LLMEngine:
    settings: dict[str, object] = {"kv_cache_bytes": 1 << 20, "block_size": 4}
    settings.update(config)
    return LLMEngine(
        loaded_from_model(copy.deepcopy(model), word_tokenizer()),
        EngineConfig(**settings),  # type: ignore[arg-type]
        sampler=ScriptedSampler(PATTERN_SCRIPT * 2),
        sampling_row_type=SamplingRow,
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, max_tokens=12, seed=1),
        greedy(12, logprobs=True),
        greedy(12, n=2),
    ],
    ids=["sampling", "logprobs", "two choices"],
)
def test_only_greedy_single_choices_without_logprobs_get_drafts(tiny_model: torch.nn.Module, params) -> None:
    engine = scripted_engine(tiny_model, speculative_max_seqs=4)
    engine.add_request(EngineRequest("x", tuple(PATTERN_PROMPT), params))
    run_until_done(engine)
    assert engine.scheduler.num_draft_tokens == 0


def test_no_drafts_while_more_sequences_run_than_allowed(tiny_model: torch.nn.Module) -> None:
    engine = scripted_engine(tiny_model, speculative_max_seqs=1)
    for index in range(2):
        engine.add_request(EngineRequest(f"x{index}", tuple(PATTERN_PROMPT), greedy(12)))
    run_until_done(engine)
    assert engine.scheduler.num_draft_tokens == 0
    alone = scripted_engine(tiny_model, speculative_max_seqs=1)
    alone.add_request(EngineRequest("y", tuple(PATTERN_PROMPT), greedy(12)))
    run_until_done(alone)
    assert alone.scheduler.num_draft_tokens > 0
    off = scripted_engine(tiny_model, speculative_tokens=0)
    off.add_request(EngineRequest("z", tuple(PATTERN_PROMPT), greedy(12)))
    run_until_done(off)
    assert off.scheduler.num_draft_tokens == 0
