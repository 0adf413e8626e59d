"""Decoding one 30-second window with a whisper model, and cutting its tokens into segments.

The decoding loop is ours (a KV-cached greedy or sampling loop over the model's forward) so that
every rule is visible: special tokens are never sampled, the first token is a timestamp of at most
1 s, timestamps come in (start, end) pairs and never go backwards, and a timestamp is forced when
timestamps together are more likely than any text token (the rules of the whisper paper).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from protoserve.server.engine.api import GREEDY_BELOW_TEMPERATURE
from protoserve.server.transcription.whisper_tokens import TIME_PER_TIMESTAMP, WhisperTokens

MAX_INITIAL_TIMESTAMP_S = 1.0
MIN_PROGRESS_S = 1.0  # a window cut before this point counts as consumed, so long audio always advances


@dataclass(frozen=True)
class DecodedWindow:
    """The sampled tokens of one window (end-of-text excluded) and each token's log-probability.

    Log-probabilities are taken from the masked logits before any temperature, so decodes of one
    window at different temperatures are comparable. `end_of_text_logprob` is None when the window
    ran out of tokens before end-of-text. `no_speech_probability` is the probability of the
    no-speech token at the start-of-transcript position (0 when the tokenizer has none).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    end_of_text_logprob: float | None = None
    no_speech_probability: float = 0.0

    @property
    def avg_logprob(self) -> float:
        """Mean log-probability per token, end-of-text counted as one more token (as whisper does)."""
        total = sum(self.logprobs) + (self.end_of_text_logprob or 0.0)
        return total / (len(self.token_ids) + 1)


@dataclass(frozen=True)
class WindowSegment:
    """A segment found in a window, times relative to the window's start."""

    start: float
    end: float
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


def apply_timestamp_rules(logits: torch.Tensor, sampled: list[int], tokens: WhisperTokens, window_s: float) -> None:
    """Mask (in place, with -inf) the tokens whisper's rules forbid after `sampled`."""
    begin = tokens.timestamp_begin
    forbidden = -float("inf")
    logits[tokens.end_of_text + 1 : begin] = forbidden  # special tokens: never sampled
    last_timestamp_index = begin + int(round(window_s / TIME_PER_TIMESTAMP))
    logits[last_timestamp_index + 1 :] = forbidden  # no timestamp past the audio in this window
    if not sampled:
        logits[:begin] = forbidden  # the first token is a timestamp ...
        logits[begin + int(MAX_INITIAL_TIMESTAMP_S / TIME_PER_TIMESTAMP) + 1 :] = forbidden  # ... early on
        return
    last_is_timestamp = sampled[-1] >= begin
    penultimate_is_timestamp = len(sampled) < 2 or sampled[-2] >= begin
    if last_is_timestamp:
        if penultimate_is_timestamp:
            logits[begin:] = forbidden  # a pair just closed: text (or end) comes next
        else:
            logits[: tokens.end_of_text] = forbidden  # a segment's end: another timestamp or end
    timestamps = [token for token in sampled if token >= begin]
    if timestamps:
        lowest = timestamps[-1] if last_is_timestamp and not penultimate_is_timestamp else timestamps[-1] + 1
        logits[begin:lowest] = forbidden  # timestamps never go backwards
    logprobs = torch.log_softmax(logits, dim=-1)
    if torch.logsumexp(logprobs[begin:], dim=-1) > logprobs[:begin].max():
        logits[:begin] = forbidden


def decoder_cache_keyword(model: Any) -> str:
    """The name of the decoder's KV cache, as a forward argument and as an output field: `cache`
    since transformers deprecated `past_key_values` (to be removed in 5.40), `past_key_values` in
    the releases before (the GPU image's 5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_window(
    model: Any,
    encoder_outputs: Any,
    prefix: list[int],
    tokens: WhisperTokens,
    *,
    window_s: float,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    suppressed_tokens: Sequence[int] = (),
) -> DecodedWindow:
    """Decode one window from its encoder outputs. `prefix` is the decoder prompt (previous text, then
    the start sequence, which holds <|startoftranscript|>). Sampling (any temperature from
    GREEDY_BELOW_TEMPERATURE up) draws from `generator`, so a seeded generator makes the decode
    reproducible."""
    device = encoder_outputs.last_hidden_state.device
    suppressed = torch.tensor(list(suppressed_tokens), dtype=torch.long)
    start_index = prefix.index(tokens.start_of_transcript) if tokens.start_of_transcript in prefix else len(prefix) - 1
    no_speech_probability = 0.0
    end_of_text_logprob: float | None = None
    with torch.inference_mode():
        next_input = torch.tensor([prefix], dtype=torch.long, device=device)
        cache_keyword = decoder_cache_keyword(model)
        cache = None
        sampled: list[int] = []
        logprobs: list[float] = []
        for step in range(max_new_tokens):
            output = model(
                encoder_outputs=encoder_outputs,
                decoder_input_ids=next_input,
                use_cache=True,
                **{cache_keyword: cache},
            )
            cache = getattr(output, cache_keyword)
            if step == 0 and tokens.no_speech is not None:
                at_start = torch.softmax(output.logits[0, start_index].float(), dim=-1)
                no_speech_probability = float(at_start[tokens.no_speech].item())
            logits = output.logits[0, -1].float()
            logits[suppressed.to(logits.device)] = -float("inf")  # the model's suppress_tokens (non-speech)
            apply_timestamp_rules(logits, sampled, tokens, window_s)
            if temperature >= GREEDY_BELOW_TEMPERATURE:
                probabilities = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probabilities.cpu(), 1, generator=generator).item())
            else:
                token = int(torch.argmax(logits).item())
            token_logprob = float(torch.log_softmax(logits, dim=-1)[token].item())
            if token == tokens.end_of_text:
                end_of_text_logprob = token_logprob
                break
            sampled.append(token)
            logprobs.append(token_logprob)
            next_input = torch.tensor([[token]], dtype=torch.long, device=device)
    return DecodedWindow(
        token_ids=tuple(sampled),
        logprobs=tuple(logprobs),
        end_of_text_logprob=end_of_text_logprob,
        no_speech_probability=no_speech_probability,
    )


def split_segments(window: DecodedWindow, tokens: WhisperTokens, window_s: float) -> tuple[list[WindowSegment], float]:
    """Cut a window's tokens at timestamp pairs; also return how far (seconds) the audio was consumed.

    A window that ends with a single timestamp, or holds no timestamp pair, was consumed entirely;
    one that ends with a closed pair was cut mid-speech, so decoding resumes at its last timestamp
    (unless that is under MIN_PROGRESS_S into the window).
    """
    ids, logprobs = window.token_ids, window.logprobs
    begin = tokens.timestamp_begin

    def seconds(token: int) -> float:
        return min((token - begin) * TIME_PER_TIMESTAMP, window_s)

    pair_ends = [i + 1 for i in range(len(ids) - 1) if ids[i] >= begin and ids[i + 1] >= begin]
    single_timestamp_ending = len(ids) >= 2 and ids[-1] >= begin and ids[-2] < begin
    if not pair_ends:
        stamps = [seconds(token) for token in ids if token >= begin]
        start = stamps[0] if stamps else 0.0
        end = stamps[-1] if len(stamps) > 1 else window_s
        return [WindowSegment(start, max(start, end), ids, logprobs)] if ids else [], window_s
    cuts = [*pair_ends, len(ids)] if single_timestamp_ending else pair_ends
    segments: list[WindowSegment] = []
    previous = 0
    for cut in cuts:
        piece = ids[previous:cut]
        stamps = [seconds(token) for token in piece if token >= begin]
        if stamps:
            segments.append(WindowSegment(stamps[0], stamps[-1], piece, logprobs[previous:cut]))
        previous = cut
    if single_timestamp_ending:
        return segments, window_s
    consumed = seconds(ids[pair_ends[-1] - 1])
    return segments, consumed if consumed >= MIN_PROGRESS_S else window_s
