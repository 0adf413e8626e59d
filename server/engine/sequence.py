"""Request and sequence state: what the scheduler, block manager and runner share about one choice.

A request with `n` choices owns `n` sequences. Only the first one prefills the prompt; the others are
forked from it once its prompt is computed (they then share the prompt's full KV blocks through
reference counts). A sequence's tokens are its prompt followed by its output.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protoserve.server.engine.api import EngineRequest, FinishReason

if TYPE_CHECKING:
    import torch
    from protoserve.server.engine.api import TokenConstraint


class SequenceStatus(enum.IntEnum):
    """Lifecycle of a sequence. Every status after PREEMPTED means finished (as in vLLM v1)."""

    WAITING = 0  # queued, nothing computed yet
    AWAITING_FORK = 1  # a sibling of choice 0, created once choice 0's prompt is computed
    RUNNING = 2
    PREEMPTED = 3  # lost its blocks, queued again to recompute prompt and output
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def is_finished(self) -> bool:
        return self > SequenceStatus.PREEMPTED

    @staticmethod
    def from_finish_reason(reason: FinishReason) -> SequenceStatus:
        return _STATUS_OF_REASON[reason]


_STATUS_OF_REASON = {
    FinishReason.STOP: SequenceStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: SequenceStatus.FINISHED_LENGTH,
    FinishReason.ABORT: SequenceStatus.FINISHED_ABORTED,
    FinishReason.ERROR: SequenceStatus.FINISHED_ERROR,
}

_sequence_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One choice of one request.

    Invariants: `num_cached_tokens <= num_computed_tokens <= len(token_ids)`; the block table
    covers at least `num_computed_tokens` tokens; `block_hashes[i]` is the prefix hash of
    `block_table[i]` for every full block hashed so far.
    """

    request: RequestState
    choice_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    sequence_id: int = field(default_factory=lambda: next(_sequence_ids))
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on first admission
    generator: torch.Generator | None = None
    constraint: TokenConstraint | None = None
    output_processor: Any = None  # a ChoiceOutputProcessor, attached by the engine
    prompt_embeddings: torch.Tensor | None = None  # multimodal: merged prompt embeddings until prefill ends

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def priority(self) -> int:
        return self.request.request.priority

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def hash_extra_key(self, start: int, end: int) -> tuple[str, ...]:
        """Extra key for the prefix hash of tokens[start:end]: the request's image content hashes
        when that range holds an image token, so blocks of different images never match."""
        request = self.request
        multimodal = request.request.multimodal
        if multimodal is None or request.image_token_id is None:
            return ()
        if any(token == request.image_token_id for token in self.token_ids[start:end]):
            return multimodal.content_hashes
        return ()


@dataclass(eq=False)
class RequestState:
    """The engine's record of one request: its choices and when it arrived."""

    request: EngineRequest
    arrival_order: int
    max_total_tokens: int  # prompt plus output tokens allowed for each choice
    image_token_id: int | None = None
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(sequence.status.is_finished for sequence in self.sequences)

    @classmethod
    def create(
        cls, request: EngineRequest, arrival_order: int, max_total_tokens: int, image_token_id: int | None
    ) -> RequestState:
        state = cls(request, arrival_order, max_total_tokens, image_token_id)
        prompt = list(request.prompt_token_ids)
        for index in range(request.params.n):
            status = SequenceStatus.WAITING if index == 0 else SequenceStatus.AWAITING_FORK
            state.sequences.append(Sequence(state, index, list(prompt), len(prompt), status))
        return state
