"""Whisper's timestamp rules and the cutting of a window's tokens into segments, on hand-made tokens."""

from __future__ import annotations

import pytest
import torch
from protoserve.server.transcription.whisper_decoding import (
    DecodedWindow,
    apply_timestamp_rules,
    decoder_cache_keyword,
    split_segments,
)
from protoserve.server.transcription.whisper_tokens import WhisperTokens

TOKENS = WhisperTokens(
    end_of_text=256,
    start_of_transcript=257,
    start_of_previous=264,
    no_timestamps=266,
    transcribe=262,
    translate=261,
    language_ids={"en": 258},
    multilingual=False,
)
BEGIN = TOKENS.timestamp_begin  # <|0.00|>
VOCAB = BEGIN + 1501


def stamp(seconds: float) -> int:
    return BEGIN + round(seconds / 0.02)


def window(*tokens: int) -> DecodedWindow:
    return DecodedWindow(token_ids=tokens, logprobs=tuple(-0.5 for _ in tokens))


def test_window_ending_with_single_timestamp_is_consumed_whole() -> None:
    decoded = window(stamp(0), 72, 73, stamp(2), stamp(2), 74, stamp(4.5))
    segments, consumed = split_segments(decoded, TOKENS, window_s=30.0)
    assert [(s.start, s.end) for s in segments] == [(0.0, 2.0), (2.0, 4.5)]
    assert segments[0].token_ids == (stamp(0), 72, 73, stamp(2))
    assert consumed == 30.0


def test_window_cut_mid_speech_resumes_at_its_last_complete_segment() -> None:
    decoded = window(stamp(0), 72, stamp(3), stamp(3), 73, stamp(27), stamp(27), 74, 75)
    segments, consumed = split_segments(decoded, TOKENS, window_s=30.0)
    assert [(s.start, s.end) for s in segments] == [(0.0, 3.0), (3.0, 27.0)]
    assert consumed == pytest.approx(27.0)


def test_window_cut_very_early_still_advances() -> None:
    decoded = window(stamp(0), 72, stamp(0.4), stamp(0.4), 73, 74)
    segments, consumed = split_segments(decoded, TOKENS, window_s=30.0)
    assert [(s.start, s.end) for s in segments] == [(0.0, 0.4)]
    assert consumed == 30.0


def test_window_without_timestamp_pairs_is_one_segment() -> None:
    segments, consumed = split_segments(window(stamp(0.5), 72, 73), TOKENS, window_s=12.0)
    assert [(s.start, s.end) for s in segments] == [(0.5, 12.0)]
    assert consumed == 12.0
    assert split_segments(window(), TOKENS, window_s=12.0) == ([], 12.0)


def test_timestamps_past_the_window_are_clamped() -> None:
    segments, _ = split_segments(window(stamp(0), 72, stamp(29)), TOKENS, window_s=10.0)
    assert segments[0].end == 10.0


def _allowed(sampled: list[int], window_s: float = 30.0) -> torch.Tensor:
    logits = torch.zeros(VOCAB)
    apply_timestamp_rules(logits, sampled, TOKENS, window_s)
    return torch.isfinite(logits).nonzero().flatten()


def test_first_token_is_an_early_timestamp() -> None:
    allowed = _allowed([])
    assert allowed.min() == BEGIN
    assert allowed.max() == stamp(1.0)


def test_special_tokens_are_never_allowed() -> None:
    allowed = set(_allowed([stamp(0), 72]).tolist())
    assert not allowed & set(range(TOKENS.end_of_text + 1, BEGIN))


def test_after_a_segment_end_only_a_timestamp_or_end_of_text() -> None:
    logits = torch.zeros(VOCAB)
    logits[TOKENS.end_of_text] = 50.0  # end of text likely enough to survive the timestamp rule
    apply_timestamp_rules(logits, [stamp(0), 72, stamp(2)], TOKENS, 30.0)
    allowed = torch.isfinite(logits).nonzero().flatten()
    assert set(allowed.tolist()) >= {TOKENS.end_of_text, stamp(2)}
    assert allowed[allowed != TOKENS.end_of_text].min() == stamp(2)  # never backwards
    assert not (allowed < TOKENS.end_of_text).any()


def test_after_a_closed_pair_text_comes_next() -> None:
    logits = torch.full((VOCAB,), -10.0)
    logits[72] = 5.0  # text more likely than all timestamps together
    apply_timestamp_rules(logits, [stamp(0), 72, stamp(2), stamp(2)], TOKENS, 30.0)
    assert not torch.isfinite(logits[BEGIN:]).any()


def test_timestamps_forced_when_together_more_likely_than_any_text() -> None:
    logits = torch.zeros(VOCAB)
    apply_timestamp_rules(logits, [stamp(0), 72], TOKENS, 30.0)
    assert not torch.isfinite(logits[:BEGIN]).any()


def test_no_timestamp_beyond_the_audio_of_the_window() -> None:
    assert _allowed([stamp(0), 72], window_s=5.0).max() == stamp(5.0)


def test_the_decoder_cache_goes_by_the_name_this_transformers_uses() -> None:
    """`cache` since transformers deprecated `past_key_values` (removed in 5.40); older releases
    (the GPU image's) know only `past_key_values`."""

    class Current(torch.nn.Module):
        def forward(self, decoder_input_ids: torch.Tensor, cache: object = None, use_cache: bool = True) -> None: ...

    class Older(torch.nn.Module):
        def forward(
            self, decoder_input_ids: torch.Tensor, past_key_values: object = None, use_cache: bool = True
        ) -> None: ...

    assert decoder_cache_keyword(Current()) == "cache"
    assert decoder_cache_keyword(Older()) == "past_key_values"
