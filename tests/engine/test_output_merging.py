"""merge_outputs: consecutive outputs of one request say the same as one."""

from __future__ import annotations

import pytest
from protoserve.server.engine.api import CompletionDelta, FinishReason, RequestOutput, TokenLogprob, TopToken, Usage
from protoserve.server.engine.output_merging import merge_outputs


def logprob(token_id: int) -> TokenLogprob:
    return TokenLogprob(token_id, -0.5, (TopToken(token_id, -0.5), TopToken(7, -1.5)))


def test_texts_tokens_and_logprobs_are_joined_per_choice() -> None:
    earlier = RequestOutput(
        "r",
        (
            CompletionDelta(0, "Hel", (1,), (logprob(1),)),
            CompletionDelta(1, "Wo", (4,), (logprob(4),)),
        ),
    )
    later = RequestOutput(
        "r",
        (
            CompletionDelta(1, "rld", (5, 6), (logprob(5), logprob(6)), FinishReason.STOP, "!"),
            CompletionDelta(0, "lo", (2,), (logprob(2),)),
        ),
        finished=False,
    )
    merged = merge_outputs([earlier, later])
    assert merged.request_id == "r" and not merged.finished and merged.usage is None
    first, second = merged.deltas
    assert (first.index, first.text, first.token_ids, first.finish_reason) == (0, "Hello", (1, 2), None)
    assert [entry.token_id for entry in first.logprobs or ()] == [1, 2]
    assert (second.index, second.text, second.token_ids) == (1, "World", (4, 5, 6))
    assert (second.finish_reason, second.stop_reason) == (FinishReason.STOP, "!")
    assert [entry.token_id for entry in second.logprobs or ()] == [4, 5, 6]


def test_the_later_output_finishes_and_carries_the_usage() -> None:
    earlier = RequestOutput("r", (CompletionDelta(0, "a", (1,)),))
    later = RequestOutput("r", (CompletionDelta(0, "", (2,), None, FinishReason.LENGTH),), True, Usage(3, 2))
    merged = merge_outputs([earlier, later])
    assert merged.finished and merged.usage == Usage(3, 2)
    assert merged.deltas == (CompletionDelta(0, "a", (1, 2), None, FinishReason.LENGTH),)


def test_a_choice_new_in_the_later_output_and_logprobs_missing_on_one_side() -> None:
    earlier = RequestOutput("r", (CompletionDelta(0, "a", (1,), ()),))
    later = RequestOutput("r", (CompletionDelta(0, "", (2,), None, FinishReason.STOP), CompletionDelta(1, "b", (3,))))
    merged = merge_outputs([earlier, later])
    assert merged.deltas[0].logprobs == () and merged.deltas[0].token_ids == (1, 2)
    assert merged.deltas[1] == CompletionDelta(1, "b", (3,))


def test_outputs_of_two_requests_or_after_the_end_are_refused() -> None:
    with pytest.raises(ValueError, match="two requests"):
        merge_outputs([RequestOutput("a", ()), RequestOutput("b", ())])
    with pytest.raises(ValueError, match="has finished"):
        merge_outputs([RequestOutput("a", (), finished=True), RequestOutput("a", ())])
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_outputs([])


def test_the_single_step_outputs_stay_as_parts_in_order() -> None:
    outputs = [RequestOutput("r", (CompletionDelta(0, text, (number,)),)) for number, text in enumerate("abc")]
    merged = merge_outputs([merge_outputs(outputs[:2]), outputs[2]])
    assert merged.parts == tuple(outputs) and merged.steps == tuple(outputs)
    assert merge_outputs(outputs) == merged
    assert merge_outputs(outputs[:1]) is outputs[0]
    assert outputs[0].steps == (outputs[0],) and outputs[0].parts == ()
    assert merged.deltas == (CompletionDelta(0, "abc", (0, 1, 2)),)


def test_a_long_backlog_merges_in_one_pass() -> None:
    """Ten thousand queued steps (a client that stalled): one output, every token in order."""
    outputs = [RequestOutput("r", (CompletionDelta(0, f"{number} ", (number,)),)) for number in range(10_000)]
    merged = merge_outputs(outputs)
    assert merged.deltas[0].token_ids == tuple(range(10_000)) and len(merged.parts) == 10_000
    assert merged.deltas[0].text == "".join(f"{number} " for number in range(10_000))
