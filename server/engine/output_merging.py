"""Merging a request's queued outputs into one, for a consumer that fell behind the engine.

The engine emits one `RequestOutput` per request per step. When the consumer (a gRPC stream, the
event loop that serves it) is slower than the steps, outputs wait in the request's queue; handing
them over one by one would make every later step cost the consumer as much again, and its lag
would only grow. `merge_outputs` joins two consecutive outputs of one request into the one output
that says the same: per choice, the texts and token ids are concatenated (logprobs too), and the
finish reason, stop reason, `finished` and usage are the later output's. Nothing is lost or
reordered, so a consumer sees the same tokens and text in fewer, larger pieces (vLLM's output
collector does the same). The merged output keeps the single-step outputs as its `parts`, for a
consumer that parses text step by step (the gRPC servicer counts reasoning tokens per step).
"""

from __future__ import annotations

from protoserve.server.engine.api import CompletionDelta, RequestOutput


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """`earlier` followed by `later`, as one output. Both belong to one request and `earlier` is
    not finished (nothing follows a finished output)."""
    if earlier.request_id != later.request_id:
        raise ValueError(f"outputs of two requests ({earlier.request_id!r}, {later.request_id!r}) cannot be merged")
    if earlier.finished:
        raise ValueError(f"request {earlier.request_id!r} has finished; no output follows it")
    deltas = {delta.index: delta for delta in earlier.deltas}
    for delta in later.deltas:
        before = deltas.get(delta.index)
        deltas[delta.index] = delta if before is None else _merge_deltas(before, delta)
    return RequestOutput(
        request_id=earlier.request_id,
        deltas=tuple(deltas.values()),
        finished=later.finished,
        usage=later.usage,
        parts=earlier.steps + later.steps,
    )


def _merge_deltas(earlier: CompletionDelta, later: CompletionDelta) -> CompletionDelta:
    if earlier.logprobs is None and later.logprobs is None:
        logprobs = None
    else:
        logprobs = (earlier.logprobs or ()) + (later.logprobs or ())
    return CompletionDelta(
        index=earlier.index,
        text=earlier.text + later.text,
        token_ids=earlier.token_ids + later.token_ids,
        logprobs=logprobs,
        finish_reason=later.finish_reason if later.finish_reason is not None else earlier.finish_reason,
        stop_reason=later.stop_reason if later.stop_reason is not None else earlier.stop_reason,
    )
