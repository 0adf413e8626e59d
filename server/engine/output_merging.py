"""Merging a request's queued outputs into one, for a consumer that fell behind the engine.

The engine emits one `RequestOutput` per request per step. When the consumer (a gRPC stream, the
event loop that serves it) is slower than the steps, outputs wait in the request's queue; handing
them over one by one would make every later step cost the consumer as much again, and its lag
would only grow. `merge_outputs` joins consecutive outputs of one request into the one output
that says the same: per choice, the texts and token ids are concatenated (logprobs too), the
finish and stop reasons are the last ones given, and `finished` and usage are the last output's.
Nothing is lost or reordered, so a consumer sees the same tokens and text in fewer, larger pieces
(vLLM's output collector does the same). The merged output keeps the single-step outputs as its
`parts`, for a consumer that parses text step by step (the gRPC servicer counts reasoning tokens
per step). The work is linear in what is merged, however far behind the consumer is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from protoserve.server.engine.api import CompletionDelta, FinishReason, RequestOutput, TokenLogprob


@dataclass
class _ChoicePieces:
    """One choice's pieces, gathered in order and joined once."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # None while no delta carried logprobs
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    def add(self, delta: CompletionDelta) -> None:
        self.texts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.stop_reason is not None:
            self.stop_reason = delta.stop_reason

    def joined(self) -> CompletionDelta:
        return CompletionDelta(
            index=self.index,
            text="".join(self.texts),
            token_ids=tuple(self.token_ids),
            logprobs=tuple(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


def merge_outputs(outputs: Sequence[RequestOutput]) -> RequestOutput:
    """`outputs`, consecutive outputs of one request in order, as one output. Only the last may be
    finished (nothing follows a finished output). One output is returned as it is."""
    if not outputs:
        raise ValueError("there is nothing to merge")
    if len(outputs) == 1:
        return outputs[0]
    request_id = outputs[0].request_id
    choices: dict[int, _ChoicePieces] = {}
    steps: list[RequestOutput] = []
    for position, output in enumerate(outputs):
        if output.request_id != request_id:
            raise ValueError(f"outputs of two requests ({request_id!r}, {output.request_id!r}) cannot be merged")
        if output.finished and position != len(outputs) - 1:
            raise ValueError(f"request {request_id!r} has finished; no output follows it")
        steps.extend(output.steps)
        for delta in output.deltas:
            pieces = choices.get(delta.index)
            if pieces is None:
                pieces = choices[delta.index] = _ChoicePieces(delta.index)
            pieces.add(delta)
    last = outputs[-1]
    return RequestOutput(
        request_id=request_id,
        deltas=tuple(pieces.joined() for pieces in choices.values()),
        finished=last.finished,
        usage=last.usage,
        parts=tuple(steps),
    )
