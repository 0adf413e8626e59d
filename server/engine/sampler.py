"""Batched token sampling: one call per engine step picks the next token of every running choice.

Order of processing for each row (each row is one choice; rows never influence each other):

1. logit_bias is added (OpenAI semantics).
2. repetition_penalty over prompt and output tokens (HF semantics: positive logits are divided by
   the penalty, negative ones multiplied), then presence and frequency penalties over output tokens
   (OpenAI semantics: `logit -= frequency * count + presence * (count > 0)`).
3. Masks: EOS while fewer than `min_tokens` tokens were generated or when `ignore_eos`, stop token
   ids while below `min_tokens`, the constraint's disallowed tokens (EOS only when the constraint
   `is_complete()`), and padding columns past the tokenizer's vocabulary. A row left with no
   allowed token gets its EOS back (the choice must end), or, with no EOS id, its unmasked logits.
4. Greedy rows take the argmax here. Other rows divide by their temperature.
5. Logprobs are the log_softmax of the logits at this point: after penalties, masks and
   temperature, before top-k/top-p/min-p truncation (greedy rows use temperature 1). So a logprob
   describes the model's processed distribution, not the truncated one the token was drawn from.
   Masked tokens (logprob -inf) never appear among the alternatives, so `top` may be shorter.
6. top-k, then top-p over what top-k kept, then min-p (relative to the most likely token).
7. Sampling by inverse transform: one uniform number per row against the cumulative
   probabilities of what truncation kept. A seeded row draws that number from its own generator,
   exactly one per step, so the same seed gives the same tokens whatever else is in the batch and
   in what order.
8. Each constrained row's constraint `accept`s the chosen token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from protoserve.server.engine.api import SamplingParams, TokenConstraint, TokenLogprob, TopToken
from protoserve.server.engine.errors import InvalidRequestError

_MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingRow:
    """One choice's state as the sampler needs it at this step."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    constraint: TokenConstraint | None
    eos_token_ids: frozenset[int]


@dataclass
class SampleResult:
    """The chosen token of each row, and its logprob where the row asked for logprobs (else None)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def validate_sampling_params_for_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Raise InvalidRequestError when token ids in `params` fall outside the vocabulary.

    The engine calls this when a request is admitted; the sampler itself ignores such ids. Also
    rejects non-finite logit biases and empty stop strings (which the output processor refuses).
    """
    for token_id, bias in params.logit_bias.items():
        if not 0 <= int(token_id) < vocab_size:
            raise InvalidRequestError(
                f"logit_bias names token id {token_id}, outside this model's vocabulary (0..{vocab_size - 1})"
            )
        if not math.isfinite(bias):
            raise InvalidRequestError(f"logit_bias for token id {token_id} is {bias}; it must be a finite number")
    for stop in params.stop:
        if not isinstance(stop, str) or not stop:
            raise InvalidRequestError(f"stop strings must be non-empty strings, got {stop!r}")
    for token_id in params.stop_token_ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"stop_token_ids names token id {token_id}, outside this model's vocabulary (0..{vocab_size - 1})"
            )
    if params.top_logprobs > _MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_logprobs is {params.top_logprobs}; at most {_MAX_TOP_LOGPROBS}")


def _needs_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _blocked_end_tokens(row: SamplingRow) -> set[int]:
    """Token ids that must not be sampled at this step because of min_tokens or ignore_eos."""
    params = row.params
    blocked: set[int] = set()
    below_min_tokens = len(row.output_token_ids) < params.min_tokens
    if params.ignore_eos or below_min_tokens:
        blocked.update(row.eos_token_ids)
    if below_min_tokens:
        blocked.update(params.stop_token_ids)
    return blocked


def _is_greedy_without_processing(row: SamplingRow) -> bool:
    """Greedy, and nothing but min_tokens/ignore_eos blocking may change its logits."""
    params = row.params
    return (
        params.greedy
        and row.constraint is None
        and not params.logprobs
        and not params.logit_bias
        and not _needs_penalties(params)
    )


class Sampler:
    """Picks one token per row from a batch of logits. Stateless between calls; one per engine.

    `vocab_size` is the tokenizer's vocabulary: logit columns past it (padding of the model's
    output layer) are never sampled. None means every column is a real token.
    """

    def __init__(self, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        """Choose the next token of every row. `logits` is [len(rows), vocab]; it is not modified."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(rows)} rows")
        if not rows:
            return SampleResult(token_ids=[], logprobs=[])
        usable_columns = logits.shape[1] if self.vocab_size is None else min(self.vocab_size, logits.shape[1])
        if all(_is_greedy_without_processing(row) for row in rows):
            return self._greedy(logits, rows, usable_columns)
        return self._process_and_choose(logits, rows, usable_columns)

    def _greedy(self, logits: torch.Tensor, rows: Sequence[SamplingRow], usable_columns: int) -> SampleResult:
        """Greedy rows without processing: the argmax of the logits as they are, without a copy.
        A row whose argmax is a token it must not take yet (min_tokens, ignore_eos) goes through
        the full path, alone with the others like it; for every other row blocking a few tokens
        cannot move the argmax (the first largest logit is not among them)."""
        argmax_ids: list[int] = logits[:, :usable_columns].argmax(dim=-1).tolist()
        redo = [index for index, row in enumerate(rows) if argmax_ids[index] in _blocked_end_tokens(row)]
        if redo:
            redone = self._process_and_choose(logits[redo], [rows[index] for index in redo], usable_columns)
            for index, token_id in zip(redo, redone.token_ids, strict=True):
                argmax_ids[index] = token_id
        return SampleResult(token_ids=argmax_ids, logprobs=[None] * len(rows))

    def _process_and_choose(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], usable_columns: int
    ) -> SampleResult:
        """Steps 1-8 of the module's docstring on a float32 copy of the logits."""
        processed = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if usable_columns < processed.shape[1]:
            processed[:, usable_columns:] = float("-inf")
        self._apply_logit_bias(processed, rows)
        if any(_needs_penalties(row.params) for row in rows):
            self._apply_penalties(processed, rows)
        self._apply_masks(processed, rows)
        chosen = self._choose(processed, rows).tolist()

        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        logprob_rows = [i for i, row in enumerate(rows) if row.params.logprobs]
        if logprob_rows:
            computed = _logprobs(
                processed[logprob_rows], [rows[i] for i in logprob_rows], [chosen[i] for i in logprob_rows]
            )
            for position, logprob in zip(logprob_rows, computed, strict=True):
                logprobs[position] = logprob
        for row, token_id in zip(rows, chosen, strict=True):
            if row.constraint is not None:
                row.constraint.accept(token_id)
        return SampleResult(token_ids=chosen, logprobs=logprobs)

    @staticmethod
    def _choose(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Greedy rows take the argmax; the others are divided by their temperature (in place, so
        that logprobs see it) and sampled."""
        device = logits.device
        greedy_index = [i for i, row in enumerate(rows) if row.params.greedy]
        random_index = [i for i, row in enumerate(rows) if not row.params.greedy]
        if not random_index:
            return logits.argmax(dim=-1)
        temperatures = torch.ones(len(rows), 1, device=device)
        temperatures[random_index, 0] = torch.tensor([rows[i].params.temperature for i in random_index], device=device)
        if not greedy_index:
            logits.div_(temperatures)
            return _sample_from(logits, rows)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
        greedy_positions = torch.tensor(greedy_index, device=device)
        token_ids[greedy_positions] = logits[greedy_positions].argmax(dim=-1)
        logits.div_(temperatures)
        random_positions = torch.tensor(random_index, device=device)
        token_ids[random_positions] = _sample_from(logits[random_positions], [rows[i] for i in random_index])
        return token_ids

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        vocab = logits.shape[1]
        row_index: list[int] = []
        token_index: list[int] = []
        biases: list[float] = []
        for position, row in enumerate(rows):
            for token_id, bias in row.params.logit_bias.items():
                if 0 <= int(token_id) < vocab:
                    row_index.append(position)
                    token_index.append(int(token_id))
                    biases.append(float(bias))
        if row_index:
            device = logits.device
            logits.index_put_(
                (torch.tensor(row_index, device=device), torch.tensor(token_index, device=device)),
                torch.tensor(biases, device=device),
                accumulate=True,
            )

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        """Touch only the logits of tokens that occurred: work grows with the sequences, not the
        vocabulary. Token (row, id) pairs are flattened to `row * vocab + id` so that one `unique`
        call counts them for the whole batch."""
        device = logits.device
        vocab = logits.shape[1]
        repeated: list[torch.Tensor] = []
        generated: list[torch.Tensor] = []
        for position, row in enumerate(rows):
            params = row.params
            if params.presence_penalty == 0.0 and params.frequency_penalty == 0.0:
                output_ids = None
            else:
                output_ids = _token_tensor(row.output_token_ids, vocab, device)
                generated.append(output_ids + position * vocab)
            if params.repetition_penalty != 1.0:
                if output_ids is None:
                    output_ids = _token_tensor(row.output_token_ids, vocab, device)
                prompt_ids = _token_tensor(row.prompt_token_ids, vocab, device)
                repeated.append(torch.cat([prompt_ids, output_ids]) + position * vocab)
        flat_logits = logits.view(-1)
        if repeated:
            seen = torch.unique(torch.cat(repeated))
            penalties = torch.tensor([row.params.repetition_penalty for row in rows], device=device)
            penalty = penalties[seen // vocab]
            values = flat_logits[seen]
            flat_logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
        if generated:
            occurred, counts = torch.unique(torch.cat(generated), return_counts=True)
            frequency = torch.tensor([row.params.frequency_penalty for row in rows], device=device)
            presence = torch.tensor([row.params.presence_penalty for row in rows], device=device)
            owner = occurred // vocab
            flat_logits[occurred] -= frequency[owner] * counts + presence[owner]

    @staticmethod
    def _apply_masks(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        vocab = logits.shape[1]
        masked_rows: list[int] = []
        masks: list[torch.Tensor] = []
        blocked_only: list[tuple[int, list[int]]] = []
        for position, row in enumerate(rows):
            blocked = _blocked_end_tokens(row)
            if row.constraint is None:
                if blocked:
                    blocked_only.append((position, [t for t in blocked if 0 <= t < vocab]))
                continue
            allowed = _constraint_mask(row, vocab)
            for token_id in blocked:
                if 0 <= token_id < vocab:
                    allowed[token_id] = False
            masked_rows.append(position)
            masks.append(allowed)
        if blocked_only:
            _block_tokens(logits, blocked_only, rows)
        if not masked_rows:
            return
        device = logits.device
        positions = torch.tensor(masked_rows, device=device)
        allowed_matrix = torch.stack(masks).to(device)
        subset = logits[positions]
        masked = subset.masked_fill(~allowed_matrix, float("-inf"))
        nothing_allowed = torch.isneginf(masked).all(dim=1)
        if bool(nothing_allowed.any()):
            for local in nothing_allowed.nonzero().flatten().tolist():
                eos_ids = [t for t in rows[masked_rows[local]].eos_token_ids if 0 <= t < vocab]
                if eos_ids:
                    masked[local, eos_ids] = subset[local, eos_ids]
                if not eos_ids or bool(torch.isneginf(masked[local]).all()):
                    masked[local] = subset[local]
        logits[positions] = masked


def _block_tokens(logits: torch.Tensor, blocked: Sequence[tuple[int, list[int]]], rows: Sequence[SamplingRow]) -> None:
    """Set a few token ids of unconstrained rows to -inf in place (min_tokens, ignore_eos), without
    building full-vocabulary masks: the same result as the masked path, with the same fallback
    (EOS back, else the unmasked row) for a row left with nothing allowed."""
    device = logits.device
    row_index = [position for position, token_ids in blocked for _ in token_ids]
    token_index = [token_id for _, token_ids in blocked for token_id in token_ids]
    if not row_index:
        return
    pairs = (torch.tensor(row_index, device=device), torch.tensor(token_index, device=device))
    saved = logits[pairs].tolist()
    logits[pairs] = float("-inf")
    positions = sorted({position for position, _ in blocked})
    # One reduction over the rows in place (no copy of the rows, no boolean matrix): a row has
    # nothing allowed exactly when its largest logit is -inf.
    if len(positions) * 2 >= logits.shape[0]:
        highest = logits.amax(dim=1)[positions]
    else:
        highest = logits[positions].amax(dim=1)
    nothing_allowed = torch.isneginf(highest).tolist()
    for position, empty in zip(positions, nothing_allowed, strict=True):
        if not empty:
            continue
        originals = {t: v for p, t, v in zip(row_index, token_index, saved, strict=True) if p == position}
        eos_ids = [t for t in rows[position].eos_token_ids if t in originals]
        for token_id in eos_ids:
            logits[position, token_id] = originals[token_id]
        if not eos_ids or bool(torch.isneginf(logits[position]).all()):
            for token_id, value in originals.items():
                logits[position, token_id] = value


def _token_tensor(token_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Token ids as a tensor, without ids outside the logits (they cannot be penalized)."""
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    return ids[(ids >= 0) & (ids < vocab)]


def _constraint_mask(row: SamplingRow, vocab: int) -> torch.Tensor:
    """Allowed tokens of a row by its constraint (all when none); EOS only if the constraint is complete."""
    if row.constraint is None:
        return torch.ones(vocab, dtype=torch.bool)
    mask = row.constraint.allowed_token_mask(vocab)
    allowed = torch.ones(vocab, dtype=torch.bool) if mask is None else mask.to("cpu", torch.bool).clone()
    if allowed.shape[0] != vocab:
        raise ValueError(f"constraint returned a mask of {allowed.shape[0]} tokens for a vocabulary of {vocab}")
    eos_ids = [t for t in row.eos_token_ids if 0 <= t < vocab]
    if eos_ids:
        allowed[eos_ids] = row.constraint.is_complete()
    return allowed


def _sample_from(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to temperature-scaled logits, then draw one token per row by
    inverse transform sampling: one uniform number per row, from the row's generator if seeded."""
    device = logits.device
    vocab = logits.shape[1]
    top_k = [row.params.top_k if 0 < row.params.top_k < vocab else vocab for row in rows]
    if any(k < vocab for k in top_k):
        largest_k = max(k for k in top_k if k < vocab)
        top_values = logits.topk(largest_k, dim=-1).values
        kth_index = torch.tensor([min(k, largest_k) - 1 for k in top_k], device=device)
        thresholds = top_values.gather(1, kth_index.unsqueeze(1))
        keeps_all = torch.tensor([k >= vocab for k in top_k], device=device).unsqueeze(1)
        logits = logits.masked_fill((logits < thresholds) & ~keeps_all, float("-inf"))
    probs = logits.softmax(dim=-1)

    nucleus_rows = [i for i, row in enumerate(rows) if row.params.top_p < 1.0]
    if nucleus_rows:
        positions = torch.tensor(nucleus_rows, device=device)
        limits = torch.tensor([rows[i].params.top_p for i in nucleus_rows], device=device)
        floors = _nucleus_floors(probs[positions], limits)
        probs[positions] = probs[positions].masked_fill(probs[positions] < floors, 0.0)

    min_p = [row.params.min_p for row in rows]
    if any(p > 0.0 for p in min_p):
        floors = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p, device=device).unsqueeze(1)
        probs.masked_fill_(probs < floors, 0.0)

    uniforms = torch.empty(len(rows), 1, device=device)
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if unseeded:
        uniforms[unseeded] = torch.rand(len(unseeded), 1, device=device)
    for position, row in enumerate(rows):
        if row.generator is not None:
            draw = torch.rand(1, generator=row.generator, device=row.generator.device)
            uniforms[position] = draw.to(device)
    cumulative = probs.cumsum(dim=-1)
    targets = uniforms * cumulative[:, -1:]
    chosen = torch.searchsorted(cumulative, targets, right=True).clamp_(max=vocab - 1)
    # Rounding can land the target past the last token with mass; take the most likely token then.
    landed_on_nothing = probs.gather(1, chosen) <= 0.0
    chosen = torch.where(landed_on_nothing, probs.argmax(dim=-1, keepdim=True), chosen)
    return chosen.squeeze(1)


# Top-p looks at this many most likely tokens first, then more, and sorts the whole row only when
# the nucleus is wider still (a flat distribution): a full sort costs far more than a small top-k.
_NUCLEUS_CANDIDATE_STAGES = (128, 2048)


def _nucleus_floors(probs: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest probability inside the top-p nucleus (the most likely token always
    stays): tokens below it are outside."""
    vocab = probs.shape[1]
    sorted_probs = cumulative = None
    for candidates in _NUCLEUS_CANDIDATE_STAGES:
        if candidates >= vocab:
            break
        sorted_probs = probs.topk(candidates, dim=-1).values
        cumulative = sorted_probs.cumsum(dim=-1)
        if bool((cumulative[:, -1] >= limits).all()):
            break
        sorted_probs = cumulative = None
    if sorted_probs is None or cumulative is None:
        sorted_probs = probs.sort(dim=-1, descending=True).values
        cumulative = sorted_probs.cumsum(dim=-1)
    inside = (cumulative - sorted_probs) < limits.unsqueeze(1)
    inside[:, 0] = True
    last_inside = inside.sum(dim=-1, keepdim=True) - 1
    return sorted_probs.gather(1, last_inside)


def _logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow], chosen: Sequence[int]) -> list[TokenLogprob]:
    """The chosen token's logprob and the top alternatives of each row (greedy rows at temperature 1)."""
    logprobs = logits.log_softmax(dim=-1)
    device = logprobs.device
    chosen_values = logprobs.gather(1, torch.tensor(chosen, device=device).unsqueeze(1)).squeeze(1).tolist()
    most = min(max(row.params.top_logprobs for row in rows), _MAX_TOP_LOGPROBS, logprobs.shape[1])
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if most > 0:
        top = logprobs.topk(most, dim=-1)
        top_values = top.values.tolist()
        top_ids = top.indices.tolist()
    results: list[TokenLogprob] = []
    for i, row in enumerate(rows):
        count = min(row.params.top_logprobs, most)
        alternatives = tuple(
            TopToken(token_id=token_id, logprob=value)
            for token_id, value in zip(top_ids[i][:count], top_values[i][:count], strict=True)
            if value != -math.inf  # masked tokens (constraint, EOS) are no alternative
        )
        results.append(TokenLogprob(token_id=chosen[i], logprob=chosen_values[i], top=alternatives))
    return results
