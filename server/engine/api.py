"""The engine's public contract: what callers hand in and what they get back.

The engine knows nothing about protobuf or HTTP. The gRPC servicers convert their messages into an
`EngineRequest` at the edge, iterate `AsyncEngine.generate(...)`, and convert each `RequestOutput`
back. Everything here is plain data; no torch tensors except the optional multimodal inputs.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class FinishReason(enum.StrEnum):
    """Why a choice ended. Values match the OpenAI strings where OpenAI has one."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller, deadline, shutdown
    ERROR = "error"  # the engine failed on this request


class TokenConstraint(Protocol):
    """Constrains one choice's decoding (JSON schema, forced tool call). One instance per choice.

    The sampler asks `allowed_token_mask` before every sampled token and reports the chosen
    token through `accept`. End-of-sequence tokens are allowed only when `is_complete()`.
    """

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor | None:
        """A bool tensor [vocab_size] of tokens allowed next, or None when any token is allowed."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token."""
        ...

    def is_complete(self) -> bool:
        """True when the output so far is a complete match, so the choice may end here."""
        ...


# Temperatures below this are greedy: dividing float32 logits by a tinier one overflows to infinity
# (1e-38 made every probability NaN and always drew the last token), and a temperature this small
# already picks the argmax but for exact ties.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated by `validate()`; defaults are OpenAI's."""

    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # a per-request torch.Generator when set
    max_tokens: int | None = None  # None: up to the context length
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    # Builds one TokenConstraint per choice (structured output, forced tool calls); None = free text.
    constraint_factory: Callable[[], TokenConstraint] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class MultimodalInputs:
    """Vision inputs of one request, already processed by the model's processor.

    `tensors` holds what the model's forward takes besides input ids (pixel_values, image_sizes,
    pixel_attention_mask, ...). `content_hashes` identify each image's bytes so that the prefix
    cache never matches across different images.
    """

    tensors: Mapping[str, Any]
    content_hashes: tuple[str, ...]


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine sees it: prompt token ids and how to continue them."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # higher runs first; FIFO among equals
    multimodal: MultimodalInputs | None = None


@dataclass(frozen=True)
class TopToken:
    """One alternative at a position."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token and its top alternatives (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class CompletionDelta:
    """What one choice produced in one engine step.

    `text` never splits a UTF-8 character and never contains (part of) a stop string;
    text held back while a stop string might still match is released in a later delta.
    `logprobs` has one entry per token id, except that a token which ends the choice without
    emitting its text (an EOS whose text is skipped, a `stop_token_ids` match) has none, as in
    OpenAI's API; its id stays in `token_ids`, so usage still counts it.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched


@dataclass(frozen=True)
class Usage:
    """Token accounting for a whole request (all choices)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class RequestOutput:
    """One message of a request's output stream. `usage` is set only when `finished`.

    A caller that fell behind may get several steps' outputs merged into one (output_merging.py):
    `deltas` then hold the joined texts and tokens, and `parts` the merged outputs themselves, in
    order, for a consumer that must see each step's text with its own token count (the reasoning
    token count). `parts` is empty for an output that is not a merge."""

    request_id: str
    deltas: tuple[CompletionDelta, ...]
    finished: bool = False
    usage: Usage | None = None
    parts: tuple[RequestOutput, ...] = ()

    @property
    def steps(self) -> tuple[RequestOutput, ...]:
        """The outputs of single steps this one stands for: its `parts`, or itself."""
        return self.parts or (self,)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine for health, metrics and tests."""

    running_requests: int
    waiting_requests: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    preemptions: int
    steps: int
    alive: bool
    # Accepted by `generate()` but not yet handed to the scheduler (the async bridge's admission
    # list); counted in neither running nor waiting. 0 for the synchronous engine.
    pending_requests: int = 0
    draft_tokens: int = 0  # speculative draft tokens run since start
    accepted_draft_tokens: int = 0  # of those, tokens the model agreed with


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the scheduler and the KV cache, one flag each on `protoserve serve`."""

    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int | None = None  # CPU (and GPU when set): bytes for the KV cache
    kv_cache_memory_fraction: float = 0.9  # GPU: fraction of free memory after loading, if no bytes given
    max_num_seqs: int = 64  # most sequences in one step
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks plus decodes)
    max_waiting_requests: int = 256  # bounded waiting queue; past it EngineOverloadedError
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    max_n: int = 8  # most choices per request
    # Speculative decoding with drafts looked up in the sequence itself (ngram_drafts.py): up to this
    # many draft tokens per step (0: off), only while at most `speculative_max_seqs` sequences run
    # (past that a step is no longer memory-bound and drafts cost more than they save), and only for
    # greedy choices without logprobs or constraints, whose output it leaves unchanged.
    speculative_tokens: int = 3
    speculative_max_seqs: int = 1
    # CPU, float32, lean forward: oneDNN-packed copies of the weights at the row counts where they
    # measure faster (packed_linear.py); False keeps the dense weights only (no extra memory).
    packed_weights: bool = True
    # CPU: C++ kernels built on this machine on first use (cpu_kernels.py: decode attention that reads
    # the paged cache in place, and the lean forward's norms, rotary embeddings, cache writes and
    # activation in one pass each). False, or a failed build, keeps torch's ops.
    cpu_kernels: bool = True


class GenerationEngine(Protocol):
    """What the servicers need from an engine. `AsyncEngine` implements it; tests may fake it."""

    @property
    def context_length(self) -> int:
        """Most prompt plus output tokens of one sequence."""
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs. Raises EngineOverloadedError, PromptTooLongError or
        InvalidRequestError before the first output; closing or cancelling the iterator aborts it."""
        ...

    def abort(self, request_id: str) -> None:
        """Abort a waiting or running request; its blocks are freed at the next step."""
        ...

    def stats(self) -> EngineStats:
        """A snapshot for health and metrics."""
        ...

    async def shutdown(self) -> None:
        """Abort everything and stop the engine thread."""
        ...
