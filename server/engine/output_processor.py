"""One choice's output: token ids in, text deltas with stop handling and finish reasons out.

The engine appends every sampled token of the choice, then calls `take_delta` once per step to get
what to stream. Finish rules, checked on every appended token, in this order:

- STOP on an EOS token, unless `ignore_eos`, or fewer than `min_tokens` tokens came before it.
  Its text follows `skip_special_tokens` (skipped: no text; kept: e.g. "<|im_end|>").
- STOP on a `stop_token_ids` token (same `min_tokens` rule); its text is not emitted, as a stop
  string's is not; `stop_reason` is the token id.
- STOP on a stop string, also one that ends inside a token or spans several; the text before it
  is emitted, the string and anything after it are not; the token ids keep every token.
- LENGTH when `max_tokens` tokens were generated or prompt plus output reach `max_total_tokens`.

Logprobs follow the text, as in OpenAI's API: a token that ends the choice without emitting text of
its own (a `stop_token_ids` match, an EOS whose text is skipped) gets no logprob entry, while its id
stays in `token_ids` (usage counts it). Every other token, stop-string tokens included, keeps its entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protoserve.server.engine.api import CompletionDelta, FinishReason, SamplingParams, TokenLogprob
from protoserve.server.engine.detokenizer import IncrementalDetokenizer
from protoserve.server.engine.stop_strings import StopStringMatcher


class ChoiceOutputProcessor:
    """Accumulates one choice's tokens and hands out each piece exactly once.

    Invariant: text, token ids and logprobs appended since the last `take_delta` are pending;
    once the final delta (the one carrying the finish reason) was taken, nothing more is pending.
    """

    def __init__(
        self,
        tokenizer: Any,
        params: SamplingParams,
        index: int,
        prompt_token_ids: Sequence[int],
        eos_token_ids: frozenset[int],
        max_total_tokens: int,
    ) -> None:
        if max_total_tokens <= len(prompt_token_ids):
            raise ValueError(
                f"max_total_tokens ({max_total_tokens}) leaves no room after {len(prompt_token_ids)} prompt tokens"
            )
        self.index = index
        self._params = params
        self._prompt_length = len(prompt_token_ids)
        self._eos_token_ids = eos_token_ids
        self._stop_token_ids = frozenset(params.stop_token_ids)
        self._max_total_tokens = max_total_tokens
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._stop_matcher = StopStringMatcher(params.stop)
        self._output_token_ids: list[int] = []
        self._pending_text: list[str] = []
        self._pending_token_ids: list[int] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self._finish_reason: FinishReason | None = None
        self._stop_reason: str | int | None = None
        self._final_delta_taken = False

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._finish_reason

    @property
    def stop_reason(self) -> str | int | None:
        """The stop string or stop token id that ended the choice (None for EOS, length, abort)."""
        return self._stop_reason

    @property
    def finished(self) -> bool:
        return self._finish_reason is not None

    @property
    def output_token_ids(self) -> Sequence[int]:
        """Every generated token id so far (a live view; do not modify)."""
        return self._output_token_ids

    def append(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Record one sampled token and decide whether the choice ends with it."""
        if self._finish_reason is not None:
            raise RuntimeError(f"choice {self.index} already finished ({self._finish_reason.value})")
        if self._params.logprobs and logprob is None:
            raise ValueError(f"choice {self.index} asked for logprobs but token {token_id} came without one")
        self._output_token_ids.append(token_id)
        self._pending_token_ids.append(token_id)
        if self._params.logprobs and logprob is not None:
            self._pending_logprobs.append(logprob)

        may_stop = len(self._output_token_ids) > self._params.min_tokens
        if may_stop and token_id in self._stop_token_ids:
            self._drop_last_logprob()
            self._finish(FinishReason.STOP, stop_reason=token_id)
            return
        text = self._detokenizer.add(token_id)
        self._add_text(text)
        if self._finish_reason is not None:  # a stop string matched
            return
        if may_stop and token_id in self._eos_token_ids and not self._params.ignore_eos:
            if not text:  # the EOS emitted nothing (skipped special token): no logprob either
                self._drop_last_logprob()
            self._finish(FinishReason.STOP)
        elif self._length_reached():
            self._finish(FinishReason.LENGTH)

    def take_delta(self) -> CompletionDelta | None:
        """Everything not yet handed out; None when there is nothing new. The final delta carries
        the finish and stop reasons; after it, always None."""
        if self._final_delta_taken:
            return None
        is_final = self._finish_reason is not None
        if not is_final and not self._pending_token_ids and not self._pending_text:
            return None
        return self._pop_delta(is_final)

    def abort(self, reason: FinishReason) -> CompletionDelta:
        """End the choice now (ABORT, ERROR, ...) and return its final delta with all remaining text.
        A choice that already finished keeps its own finish reason."""
        if self._finish_reason is None:
            self._finish(reason)
        if self._final_delta_taken:
            return CompletionDelta(
                index=self.index,
                text="",
                token_ids=(),
                logprobs=() if self._params.logprobs else None,
                finish_reason=self._finish_reason,
                stop_reason=self._stop_reason,
            )
        return self._pop_delta(is_final=True)

    def _drop_last_logprob(self) -> None:
        """Forget the logprob of the token just appended (a stopping token whose text is withheld)."""
        if self._pending_logprobs:
            self._pending_logprobs.pop()

    def _length_reached(self) -> bool:
        generated = len(self._output_token_ids)
        max_tokens = self._params.max_tokens
        if max_tokens is not None and generated >= max_tokens:
            return True
        return self._prompt_length + generated >= self._max_total_tokens

    def _add_text(self, text: str) -> None:
        """Pass decoded text through the stop strings; a match finishes the choice."""
        if not text:
            return
        safe_text, matched = self._stop_matcher.feed(text)
        if safe_text:
            self._pending_text.append(safe_text)
        if matched is not None:
            self._finish_reason = FinishReason.STOP
            self._stop_reason = matched

    def _finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """End for a reason other than a stop string: release held text (which may still hold one)."""
        self._add_text(self._detokenizer.flush())
        if self._finish_reason is not None:  # the released text completed a stop string
            return
        self._finish_reason = reason
        self._stop_reason = stop_reason
        remaining = self._stop_matcher.flush()
        if remaining:
            self._pending_text.append(remaining)

    def _pop_delta(self, is_final: bool) -> CompletionDelta:
        delta = CompletionDelta(
            index=self.index,
            text="".join(self._pending_text),
            token_ids=tuple(self._pending_token_ids),
            logprobs=tuple(self._pending_logprobs) if self._params.logprobs else None,
            finish_reason=self._finish_reason if is_final else None,
            stop_reason=self._stop_reason if is_final else None,
        )
        self._pending_text.clear()
        self._pending_token_ids.clear()
        self._pending_logprobs.clear()
        self._final_delta_taken = is_final
        return delta
