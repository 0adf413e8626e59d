"""The synchronous engine loop: `step()` = schedule, run, sample, postprocess.

Single-threaded and free of asyncio, so it is testable on its own; `AsyncEngine` drives it from
one thread. The engine knows token ids only: tokenization, chat templates and text belong to the
caller and to the per-choice output processors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from typing import TYPE_CHECKING, Any, Protocol

import torch
from protoserve.server.engine.api import (
    CompletionDelta,
    EngineConfig,
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestOutput,
    TokenLogprob,
    Usage,
)
from protoserve.server.engine.errors import InvalidRequestError, PromptTooLongError
from protoserve.server.engine.model_runner import ModelRunner
from protoserve.server.engine.multimodal import compute_prompt_embeddings, image_token_id_of, supports_images
from protoserve.server.engine.ngram_drafts import propose_draft
from protoserve.server.engine.output_processor import ChoiceOutputProcessor
from protoserve.server.engine.sampler import Sampler, SamplingRow, validate_sampling_params_for_vocab
from protoserve.server.engine.scheduler import Scheduler, SchedulerOutput
from protoserve.server.engine.sequence import RequestState, Sequence, SequenceStatus

if TYPE_CHECKING:
    from protoserve.server.engine.loader import LoadedModel


class SamplerLike(Protocol):
    def sample(self, logits: torch.Tensor, rows: SequenceOf[Any]) -> Any: ...


class LLMEngine:
    """Continuous batching over one loaded model.

    `sampler`, `sampling_row_type` and `output_processor_factory` default to the sampling
    engineer's `Sampler`, `SamplingRow` and `ChoiceOutputProcessor`; tests may pass fakes.
    `step_fault_hook`, when set, is called after scheduling each step (test-only): if it raises,
    the step fails as if the model had.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        sampler: SamplerLike | None = None,
        sampling_row_type: Callable[..., Any] | None = None,
        output_processor_factory: Callable[..., Any] | None = None,
    ) -> None:
        if sampler is None or sampling_row_type is None:
            tokenizer_size = len(loaded.tokenizer) if loaded.tokenizer is not None else None
            sampler = sampler or Sampler(vocab_size=tokenizer_size)
            sampling_row_type = sampling_row_type or SamplingRow
        if output_processor_factory is None:
            output_processor_factory = ChoiceOutputProcessor
        self.loaded = loaded
        self.config = config
        self.sampler = sampler
        self.sampling_row_type = sampling_row_type
        self.output_processor_factory = output_processor_factory
        self.context_length = min(loaded.context_length, config.max_model_len or loaded.context_length)
        self.image_token_id = image_token_id_of(loaded.model) if supports_images(loaded.model) else None
        self.runner = ModelRunner(loaded.model, config, self.image_token_id)
        self.scheduler = Scheduler(config, self.runner.num_blocks)
        self.scheduler.draft_provider = self._propose_draft
        self.vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self.requests: dict[str, RequestState] = {}
        self.steps = 0
        self.step_fault_hook: Callable[[], None] | None = None
        self.last_step_request_ids: tuple[str, ...] = ()
        self._arrival = itertools.count()

    # ----- requests -----

    def validate(self, request: EngineRequest) -> int:
        """Check a request before queueing; returns its max prompt-plus-output tokens per choice."""
        prompt_tokens = len(request.prompt_token_ids)
        params = request.params
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if prompt_tokens == 0:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        if not 1 <= params.n <= self.config.max_n:
            raise InvalidRequestError(f"n must be between 1 and {self.config.max_n}, got {params.n}")
        if params.max_tokens is not None and params.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {params.max_tokens}")
        out_of_range = [t for t in request.prompt_token_ids if not 0 <= t < self.vocab_size]
        if out_of_range:
            raise InvalidRequestError(
                f"prompt token id {out_of_range[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if request.multimodal is not None and self.image_token_id is None:
            raise InvalidRequestError(f"model {self.loaded.model_id!r} does not accept images")
        validate_sampling_params_for_vocab(params, self.vocab_size)
        requested_output = params.max_tokens if params.max_tokens is not None else 1
        if prompt_tokens + requested_output > self.context_length:
            raise PromptTooLongError(prompt_tokens, requested_output, self.context_length)
        self.scheduler.check_fits(prompt_tokens + requested_output)
        self.scheduler.check_waiting_room()
        if params.max_tokens is None:
            return self.context_length
        return prompt_tokens + params.max_tokens

    def add_request(self, request: EngineRequest) -> None:
        """Validate and queue a request. Raises the errors of `errors.py` on bad input or overload."""
        max_total_tokens = self.validate(request)
        state = RequestState.create(request, next(self._arrival), max_total_tokens, self.image_token_id)
        if request.multimodal is not None:
            state.sequences[0].prompt_embeddings = compute_prompt_embeddings(
                self.loaded.model, request.prompt_token_ids, request.multimodal, self.image_token_id
            )
        for sequence in state.sequences:
            self._attach_choice_state(sequence)
        self.scheduler.add_request(state)
        self.requests[request.request_id] = state

    def _attach_choice_state(self, sequence: Sequence) -> None:
        params = sequence.request.request.params
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed((params.seed * 1_000_003 + sequence.choice_index) % (2**63))
            sequence.generator = generator
        if params.constraint_factory is not None:
            sequence.constraint = params.constraint_factory()
        sequence.output_processor = self.output_processor_factory(
            self.loaded.tokenizer,
            params,
            sequence.choice_index,
            sequence.request.request.prompt_token_ids,
            self.loaded.eos_token_ids,
            sequence.request.max_total_tokens,
        )

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> RequestOutput | None:
        """End a waiting or running request; returns its final output, or None if it is unknown."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        ended = self.scheduler.finish_request(state, SequenceStatus.from_finish_reason(reason))
        deltas = tuple(sequence.output_processor.abort(reason) for sequence in ended)
        return RequestOutput(request_id, deltas, finished=True, usage=self._usage(state))

    def fail_requests(self, request_ids: SequenceOf[str]) -> list[str]:
        """End requests with ERROR after a failed step, freeing their blocks; returns those ended."""
        failed = [request_id for request_id in request_ids if request_id in self.requests]
        for request_id in failed:
            state = self.requests.pop(request_id)
            self.scheduler.finish_request(state, SequenceStatus.FINISHED_ERROR)
        return failed

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ----- one step -----

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, and return this step's outputs (one per touched request)."""
        output = self.scheduler.schedule()
        # Copies come first: they belong to forks made last step, whatever happens to this one.
        self.runner.copy_blocks(output.block_copies)
        self.last_step_request_ids = tuple(dict.fromkeys(item.sequence.request.request_id for item in output.scheduled))
        if self.step_fault_hook is not None:
            self.step_fault_hook()
        sampled: dict[Sequence, list[int]] = {}
        logprobs: dict[Sequence, TokenLogprob | None] = {}
        if not output.is_empty:
            logits = self.runner.execute(output)
            rows, row_sequences, logit_rows = self._sampling_rows(output)
            if rows:
                if logit_rows != list(range(logits.shape[0])):  # forked choices share their prompt's row
                    index = torch.tensor(logit_rows, dtype=torch.long, device=logits.device)
                    logits = logits.index_select(0, index)
                result = self.sampler.sample(logits, rows)
                chosen: dict[Sequence, list[int]] = {}
                for sequence, token_id, logprob in zip(row_sequences, result.token_ids, result.logprobs, strict=True):
                    chosen.setdefault(sequence, []).append(int(token_id))
                    logprobs[sequence] = logprob
                drafts = {item.sequence: item.draft_token_ids for item in output.scheduled if item.draft_token_ids}
                sampled = {sequence: _accepted(drafts.get(sequence, ()), tokens) for sequence, tokens in chosen.items()}
        appended = self.scheduler.update_from_output(output, sampled)
        self.steps += 1
        return self._postprocess(output, appended, logprobs)

    def _sampling_rows(self, output: SchedulerOutput) -> tuple[list[Any], list[Sequence], list[int]]:
        """One row per sequence that samples this step; a prompt finishing with choices still
        awaiting their fork samples those choices from the same logits."""
        rows: list[Any] = []
        row_sequences: list[Sequence] = []
        logit_rows: list[int] = []
        logit_row = 0
        for item in output.scheduled:
            if not item.needs_sample:
                continue
            sequence = item.sequence
            if item.draft_token_ids:
                # Row j decides the token after draft j-1, as if drafts 0..j-1 were already accepted.
                for accepted in range(len(item.draft_token_ids) + 1):
                    rows.append(self._sampling_row(sequence, item.draft_token_ids[:accepted]))
                    row_sequences.append(sequence)
                    logit_rows.append(logit_row)
                    logit_row += 1
                continue
            choices = [sequence]
            if sequence.choice_index == 0 and sequence.num_output_tokens == 0:
                choices += [s for s in sequence.request.sequences[1:] if s.status == SequenceStatus.AWAITING_FORK]
            for choice in choices:
                rows.append(self._sampling_row(choice))
                row_sequences.append(choice)
                logit_rows.append(logit_row)
            logit_row += 1
        return rows, row_sequences, logit_rows

    def _sampling_row(self, sequence: Sequence, drafts: tuple[int, ...] = ()) -> Any:
        return self.sampling_row_type(
            params=sequence.request.request.params,
            generator=sequence.generator,
            prompt_token_ids=sequence.token_ids[: sequence.num_prompt_tokens],
            output_token_ids=sequence.output_token_ids + list(drafts) if drafts else sequence.output_token_ids,
            constraint=sequence.constraint,
            eos_token_ids=self.loaded.eos_token_ids,
        )

    def _propose_draft(self, sequence: Sequence, room: int) -> list[int]:
        """Speculative draft tokens for greedy single-choice text requests without logprobs or
        constraints (their output stays what plain decoding gives); [] for every other request."""
        request = sequence.request.request
        params = request.params
        if (
            not params.greedy
            or params.logprobs
            or params.constraint_factory is not None
            or params.n != 1
            or request.multimodal is not None
        ):
            return []
        return propose_draft(sequence.token_ids, room)

    def _postprocess(
        self,
        output: SchedulerOutput,
        appended: list[tuple[Sequence, int]],
        logprobs: dict[Sequence, TokenLogprob | None],
    ) -> list[RequestOutput]:
        final_deltas: dict[Sequence, CompletionDelta] = {}
        touched: dict[str, RequestState] = {}
        for sequence, count in appended:
            processor = sequence.output_processor
            first = sequence.num_tokens - count
            for index in range(first, sequence.num_tokens):
                processor.append(sequence.token_ids[index], logprobs.get(sequence) if count == 1 else None)
                if processor.finish_reason is not None:
                    del sequence.token_ids[index + 1 :]  # accepted drafts past a stop are not output
                    sequence.num_computed_tokens = min(sequence.num_computed_tokens, sequence.num_tokens)
                    break
            touched[sequence.request.request_id] = sequence.request
            reason = processor.finish_reason
            if reason is not None:
                self.scheduler.finish_sequence(sequence, SequenceStatus.from_finish_reason(reason))
            elif sequence.num_tokens >= sequence.request.max_total_tokens:
                self.scheduler.finish_sequence(sequence, SequenceStatus.FINISHED_LENGTH)
                final_deltas[sequence] = processor.abort(FinishReason.LENGTH)
        for sequence in output.out_of_cache:
            final_deltas[sequence] = sequence.output_processor.abort(FinishReason.LENGTH)
            touched[sequence.request.request_id] = sequence.request
        outputs: list[RequestOutput] = []
        for request_id, state in touched.items():
            deltas: list[CompletionDelta] = []
            for sequence in state.sequences:
                delta = final_deltas.get(sequence) or sequence.output_processor.take_delta()
                if delta is not None:
                    deltas.append(delta)
            finished = state.is_finished
            if finished:
                self.requests.pop(request_id, None)
            if deltas or finished:
                usage = self._usage(state) if finished else None
                outputs.append(RequestOutput(request_id, tuple(deltas), finished=finished, usage=usage))
        return outputs

    @staticmethod
    def _usage(state: RequestState) -> Usage:
        return Usage(
            prompt_tokens=state.num_prompt_tokens,
            completion_tokens=sum(sequence.num_output_tokens for sequence in state.sequences),
            cached_tokens=state.sequences[0].num_cached_tokens,
        )

    def stats(self, alive: bool = True) -> EngineStats:
        block_manager = self.scheduler.block_manager
        return EngineStats(
            running_requests=self.scheduler.num_running_requests,
            waiting_requests=self.scheduler.num_waiting_requests,
            kv_blocks_total=block_manager.num_blocks,
            kv_blocks_used=block_manager.num_used_blocks,
            prefix_cache_queries=block_manager.prefix_cache_queries,
            prefix_cache_hits=block_manager.prefix_cache_hits,
            preemptions=self.scheduler.num_preemptions,
            steps=self.steps,
            draft_tokens=self.scheduler.num_draft_tokens,
            accepted_draft_tokens=self.scheduler.num_accepted_draft_tokens,
            alive=alive,
        )


def _accepted(drafts: tuple[int, ...], chosen: list[int]) -> list[int]:
    """The tokens a step yields for one sequence: the leading drafts the sampler chose too, then
    the sampler's own token after them (`chosen` has one token per draft plus one)."""
    accepted = 0
    while accepted < len(drafts) and chosen[accepted] == drafts[accepted]:
        accepted += 1
    return [*drafts[:accepted], chosen[accepted]]
