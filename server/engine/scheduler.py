"""Which tokens of which sequences run in the next forward pass.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences are served first, decodes before prefill chunks, so decodes are never starved
by a long prompt; the remaining budget admits waiting sequences in (priority desc, arrival) order,
and a long prompt is split over several steps (chunked prefill). When a running sequence needs a
block and none is free, the lowest-priority, latest-arrived running sequence is preempted: it
loses its blocks (cached ones stay in the prefix cache) and goes back to the waiting queue to be
recomputed.

Speculative decoding: while at most `speculative_max_seqs` sequences run, a decoding sequence
for which the `draft_provider` proposes tokens gets them scheduled after its real last token, in
the same forward. `update_from_output()` then receives the tokens the sampler accepted (the drafts
the model agreed with, plus its own next token), and only the KV of the real token and of the
accepted drafts counts as computed; the slots of rejected drafts are rewritten later.

`schedule()` returns a plain `SchedulerOutput`; `update_from_output()` consumes what the runner
and sampler produced for it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

from protoserve.server.engine.api import EngineConfig
from protoserve.server.engine.block_manager import BlockManager
from protoserve.server.engine.errors import EngineOverloadedError, KVCacheExhaustedError
from protoserve.server.engine.sequence import RequestState, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    """`num_new_tokens` tokens of `sequence`, starting at position `start`, run this step. The last
    `len(draft_token_ids)` of them are speculative drafts that follow the sequence's real tokens."""

    sequence: Sequence
    start: int
    num_new_tokens: int
    draft_token_ids: tuple[int, ...] = ()

    @property
    def num_real_tokens(self) -> int:
        return self.num_new_tokens - len(self.draft_token_ids)

    @property
    def needs_sample(self) -> bool:
        """True when this chunk reaches the sequence's last token, so its logits give the next one."""
        return self.start + self.num_real_tokens == self.sequence.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination), before the forward
    preempted: list[Sequence] = field(default_factory=list)
    out_of_cache: list[Sequence] = field(default_factory=list)  # ended: cannot grow even alone (finish LENGTH)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _waiting_order(sequence: Sequence) -> tuple[int, int, int]:
    return (-sequence.priority, sequence.request.arrival_order, sequence.choice_index)


class Scheduler:
    """Owns the waiting queue, the running list and the block manager."""

    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")
        self.config = config
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: list[Sequence] = []  # sorted by _waiting_order
        self.running: list[Sequence] = []
        self.pending_block_copies: list[tuple[int, int]] = []
        self.num_preemptions = 0
        # Set by the engine: the draft tokens to try after a decoding sequence's last token ([] for none).
        self.draft_provider: Callable[[Sequence, int], list[int]] | None = None
        self.num_draft_tokens = 0  # drafts scheduled so far
        self.num_accepted_draft_tokens = 0  # drafts the model agreed with

    # ----- queue management -----

    @property
    def num_waiting_requests(self) -> int:
        return len({id(sequence.request) for sequence in self.waiting})

    @property
    def num_running_requests(self) -> int:
        return len({id(sequence.request) for sequence in self.running})

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_fits(self, num_tokens: int) -> None:
        """Raise KVCacheExhaustedError when `num_tokens` of one sequence can never be held."""
        needed = self.block_manager.blocks_needed(num_tokens)
        if needed > self.block_manager.num_blocks:
            capacity = self.block_manager.num_blocks * self.block_manager.block_size
            raise KVCacheExhaustedError(
                f"the request needs {num_tokens} tokens of KV cache but the cache holds only {capacity}; "
                "shorten the prompt or lower max_tokens"
            )

    def check_waiting_room(self) -> None:
        """Raise EngineOverloadedError when the waiting queue is full."""
        waiting_requests = self.num_waiting_requests
        if waiting_requests >= self.config.max_waiting_requests:
            raise EngineOverloadedError(waiting_requests, self.config.max_waiting_requests)

    def add_request(self, state: RequestState) -> None:
        """Queue a request's first sequence. Raises EngineOverloadedError when the queue is full."""
        self.check_waiting_room()
        self.check_fits(state.num_prompt_tokens + 1)
        self._enqueue(state.sequences[0])

    def _enqueue(self, sequence: Sequence) -> None:
        keys = [_waiting_order(waiting) for waiting in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, _waiting_order(sequence)), sequence)

    def finish_sequence(self, sequence: Sequence, status: SequenceStatus) -> None:
        """End a sequence (any state) and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"{status.name} is not a finished status")
        if sequence.status.is_finished:
            return
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        self.block_manager.free(sequence)
        sequence.status = status
        sequence.prompt_embeddings = None

    def finish_request(self, state: RequestState, status: SequenceStatus) -> list[Sequence]:
        """End every unfinished sequence of a request; returns those it ended."""
        ended = [sequence for sequence in state.sequences if not sequence.status.is_finished]
        for sequence in ended:
            self.finish_sequence(sequence, status)
        return ended

    # ----- one step -----

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(block_copies=self.pending_block_copies)
        self.pending_block_copies = []
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[int] = set()

        # Running sequences: decodes first, then prefill chunks; each by priority and arrival.
        for sequence in sorted(self.running, key=lambda s: (s.is_prefilling, *_waiting_order(s))):
            if budget == 0 or len(output.scheduled) >= self.config.max_num_seqs:
                break
            if sequence.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(sequence.num_tokens - sequence.num_computed_tokens, budget)
            drafts = self._drafts(sequence, num_new, budget)
            num_new += len(drafts)
            if not self._make_room(sequence, num_new, scheduled_ids, output):
                continue
            self.block_manager.append_slots(sequence, num_new)
            output.scheduled.append(ScheduledSequence(sequence, sequence.num_computed_tokens, num_new, drafts))
            scheduled_ids.add(sequence.sequence_id)
            budget -= num_new

        # Waiting sequences, while budget, sequence slots and blocks last (no overtaking).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            sequence = self.waiting[0]
            num_cached = self.block_manager.allocate_first(sequence, budget)
            if num_cached is None:
                break
            self.waiting.pop(0)
            if sequence.status == SequenceStatus.WAITING:
                sequence.num_cached_tokens = num_cached
            sequence.num_computed_tokens = num_cached
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
            num_new = min(sequence.num_tokens - num_cached, budget)
            output.scheduled.append(ScheduledSequence(sequence, num_cached, num_new))
            scheduled_ids.add(sequence.sequence_id)
            budget -= num_new
        return output

    def _drafts(self, sequence: Sequence, num_new: int, budget: int) -> tuple[int, ...]:
        """Draft tokens for a decoding sequence, when speculation is on and few sequences run."""
        config = self.config
        if (
            self.draft_provider is None
            or config.speculative_tokens < 1
            or num_new != 1
            or len(self.running) > config.speculative_max_seqs
        ):
            return ()
        room = min(config.speculative_tokens, budget - 1, sequence.request.max_total_tokens - sequence.num_tokens - 1)
        if room < 1 or not self.block_manager.can_append(sequence, 1 + room):
            return ()  # drafts never cost another sequence its blocks
        drafts = tuple(self.draft_provider(sequence, room)[:room])
        self.num_draft_tokens += len(drafts)
        return drafts

    def _make_room(self, sequence: Sequence, num_new: int, scheduled_ids: set[int], output: SchedulerOutput) -> bool:
        """Preempt running sequences until `sequence` can grow by `num_new` tokens.
        False when `sequence` itself was preempted or ended instead."""
        while not self.block_manager.can_append(sequence, num_new):
            candidates = [s for s in self.running if s.sequence_id not in scheduled_ids]
            if len(self.running) == 1:
                # Alone and still out of blocks: it can never grow; end it with LENGTH.
                self.running.remove(sequence)
                self.block_manager.free(sequence)
                sequence.status = SequenceStatus.FINISHED_LENGTH
                output.out_of_cache.append(sequence)
                return False
            victim = min(candidates, key=lambda s: (s.priority, -s.request.arrival_order, -s.choice_index))
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is sequence:
                return False
        return True

    def _preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self.block_manager.free(sequence)
        sequence.num_computed_tokens = 0
        sequence.status = SequenceStatus.PREEMPTED
        sequence.prompt_embeddings = None
        self.num_preemptions += 1
        self._enqueue(sequence)

    def update_from_output(
        self, output: SchedulerOutput, sampled: Mapping[Sequence, SequenceOf[int]]
    ) -> list[tuple[Sequence, int]]:
        """Advance computed tokens, register full blocks in the prefix cache, fork choices waiting
        on a finished prompt, and append sampled tokens (one per sequence, or for a sequence that
        ran drafts: the accepted drafts and the model's next token). Returns the sequences that got
        tokens, with how many (forked siblings included)."""
        appended: list[tuple[Sequence, int]] = []
        done: set[int] = set()
        for item in output.scheduled:
            sequence = item.sequence
            if sequence.status != SequenceStatus.RUNNING:
                continue
            if item.draft_token_ids:
                # Appended first: the accepted drafts' blocks are hashed from the sequence's tokens.
                tokens = list(sampled.get(sequence, ()))
                accepted = max(len(tokens) - 1, 0)
                self.num_accepted_draft_tokens += accepted
                sequence.num_computed_tokens = item.start + item.num_real_tokens + accepted
                for token_id in tokens:
                    sequence.append_token(token_id)
                if tokens:
                    appended.append((sequence, len(tokens)))
                done.add(sequence.sequence_id)
            else:
                sequence.num_computed_tokens = item.start + item.num_new_tokens
            self.block_manager.cache_full_blocks(sequence)
            if not sequence.is_prefilling:
                sequence.prompt_embeddings = None
            if item.needs_sample and sequence.choice_index == 0:
                self._fork_siblings(sequence)
        for sequence, token_ids in sampled.items():
            if sequence.sequence_id in done or not token_ids:
                continue
            if sequence.status == SequenceStatus.RUNNING or sequence.status == SequenceStatus.PREEMPTED:
                for token_id in token_ids:
                    sequence.append_token(token_id)
                appended.append((sequence, len(token_ids)))
        return appended

    def _fork_siblings(self, parent: Sequence) -> None:
        for sibling in parent.request.sequences[1:]:
            if sibling.status != SequenceStatus.AWAITING_FORK:
                continue
            copies = self.block_manager.fork(parent, sibling)
            if copies is None:
                sibling.status = SequenceStatus.PREEMPTED  # recomputes its prompt once blocks free up
                self._enqueue(sibling)
                continue
            self.pending_block_copies.extend(copies)
            sibling.status = SequenceStatus.RUNNING
            self.running.append(sibling)
