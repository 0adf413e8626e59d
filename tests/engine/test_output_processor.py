"""One choice's deltas: text, ids and logprobs handed out once; every finish rule."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from protoserve.server.engine.api import CompletionDelta, FinishReason, SamplingParams, TokenLogprob
from protoserve.server.engine.output_processor import ChoiceOutputProcessor

from .sampling_fixtures import byte_level_tokenizer

TOKENIZER = byte_level_tokenizer()
EOS = TOKENIZER.eos_token_id
IM_END = TOKENIZER.convert_tokens_to_ids("<|im_end|>")
PROMPT = TOKENIZER.encode("The quick brown fox", add_special_tokens=False)


def encode(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def processor(params: SamplingParams | None = None, max_total_tokens: int = 1000) -> ChoiceOutputProcessor:
    return ChoiceOutputProcessor(
        TOKENIZER, params or SamplingParams(), 0, PROMPT, frozenset({EOS, IM_END}), max_total_tokens
    )


def feed(choice: ChoiceOutputProcessor, ids: Sequence[int]) -> list[CompletionDelta]:
    """Append ids one at a time (stopping at the finish) and take a delta after each."""
    deltas: list[CompletionDelta] = []
    for token_id in ids:
        if choice.finished:
            break
        choice.append(token_id, None)
        delta = choice.take_delta()
        if delta is not None:
            deltas.append(delta)
    return deltas


def joined(deltas: Sequence[CompletionDelta]) -> tuple[str, list[int]]:
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]


def test_text_streams_and_eos_stops_without_text_when_skipped() -> None:
    choice = processor()
    ids = encode(" jumps 😀 over") + [EOS]
    deltas = feed(choice, ids + encode(" never seen"))
    assert joined(deltas) == (" jumps 😀 over", ids)
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].stop_reason is None
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert choice.take_delta() is None
    assert list(choice.output_token_ids) == ids


def test_eos_text_is_kept_when_special_tokens_are_not_skipped() -> None:
    choice = processor(SamplingParams(skip_special_tokens=False))
    deltas = feed(choice, encode(" hi") + [IM_END])
    assert joined(deltas)[0] == " hi<|im_end|>"
    assert choice.finish_reason is FinishReason.STOP


def test_ignore_eos_and_min_tokens_keep_going() -> None:
    choice = processor(SamplingParams(ignore_eos=True))
    feed(choice, [EOS, EOS])
    assert choice.finish_reason is None
    choice = processor(SamplingParams(min_tokens=2))
    feed(choice, [EOS, EOS])
    assert choice.finish_reason is None
    feed(choice, [EOS])
    assert choice.finish_reason is FinishReason.STOP


def test_stop_token_id_stops_keeps_the_id_but_not_its_text() -> None:
    stop_id = encode(".")[0]
    choice = processor(SamplingParams(stop_token_ids=(stop_id,)))
    ids = encode(" jumps.") + encode(" more")
    deltas = feed(choice, ids)
    assert joined(deltas) == (" jumps", encode(" jumps."))
    assert (choice.finish_reason, choice.stop_reason) == (FinishReason.STOP, stop_id)
    assert deltas[-1].stop_reason == stop_id


def test_stop_string_across_tokens_and_inside_a_token() -> None:
    choice = processor(SamplingParams(stop=["mps ov"]))
    ids = encode(" jumps over the dog")
    deltas = feed(choice, ids)
    text, emitted_ids = joined(deltas)
    assert text == " ju"
    assert (choice.finish_reason, choice.stop_reason) == (FinishReason.STOP, "mps ov")
    assert emitted_ids == list(choice.output_token_ids)
    # The token that completed the match is kept, even though it also holds text after the match.
    assert TOKENIZER.decode(emitted_ids).startswith(" jumps ov")
    assert len(emitted_ids) < len(ids)


def test_stop_string_text_held_back_then_released_at_eos() -> None:
    choice = processor(SamplingParams(stop=["STOP"]))
    deltas = feed(choice, encode(" ST") + [EOS])
    assert joined(deltas)[0] == " ST"
    assert choice.finish_reason is FinishReason.STOP and choice.stop_reason is None


def test_stop_string_completed_by_the_last_character_of_a_split_emoji() -> None:
    choice = processor(SamplingParams(stop=["😀"]))
    deltas = feed(choice, encode(" a😀b"))
    assert joined(deltas)[0] == " a"
    assert choice.stop_reason == "😀"


def test_length_by_max_tokens_and_by_context() -> None:
    choice = processor(SamplingParams(max_tokens=3))
    deltas = feed(choice, encode(" jumps over the lazy dog"))
    assert len(joined(deltas)[1]) == 3
    assert choice.finish_reason is FinishReason.LENGTH
    choice = processor(max_total_tokens=len(PROMPT) + 2)
    feed(choice, encode(" jumps over the lazy dog"))
    assert (len(choice.output_token_ids), choice.finish_reason) == (2, FinishReason.LENGTH)


def test_eos_on_the_last_allowed_token_is_a_stop() -> None:
    choice = processor(SamplingParams(max_tokens=2))
    feed(choice, encode(" a") + [EOS])
    assert choice.finish_reason is FinishReason.STOP


def test_deltas_accumulate_until_taken_and_split_characters_wait() -> None:
    choice = processor()
    emoji_ids = encode("😀")
    assert len(emoji_ids) > 1
    for token_id in emoji_ids[:-1]:
        choice.append(token_id, None)
    delta = choice.take_delta()
    assert delta is not None and delta.text == "" and list(delta.token_ids) == emoji_ids[:-1]
    choice.append(emoji_ids[-1], None)
    delta = choice.take_delta()
    assert delta is not None and delta.text == "😀"
    assert choice.take_delta() is None


def test_logprobs_travel_with_their_tokens() -> None:
    choice = processor(SamplingParams(logprobs=True))
    ids = encode(" jumps")
    for position, token_id in enumerate(ids):
        choice.append(token_id, TokenLogprob(token_id=token_id, logprob=-float(position)))
    delta = choice.take_delta()
    assert delta is not None and delta.logprobs is not None
    assert [lp.token_id for lp in delta.logprobs] == list(delta.token_ids)
    assert processor().abort(FinishReason.ABORT).logprobs is None


def test_abort_releases_held_text_and_keeps_an_earlier_finish() -> None:
    choice = processor(SamplingParams(stop=["STOP"]))
    feed(choice, encode(" ST"))
    final = choice.abort(FinishReason.ABORT)
    assert (final.text, final.finish_reason) == ("ST", FinishReason.ABORT)
    assert choice.take_delta() is None
    finished = processor()
    feed(finished, [EOS])
    again = finished.abort(FinishReason.ERROR)
    assert (again.text, again.token_ids, again.finish_reason) == ("", (), FinishReason.STOP)


def test_misuse_is_a_clear_error() -> None:
    choice = processor()
    feed(choice, [EOS])
    with pytest.raises(RuntimeError, match="already finished"):
        choice.append(5, None)
    with pytest.raises(ValueError, match="asked for logprobs"):
        processor(SamplingParams(logprobs=True)).append(5, None)
    with pytest.raises(ValueError, match="leaves no room"):
        processor(max_total_tokens=len(PROMPT))


def test_stream_and_whole_agree() -> None:
    """Taking deltas every token or once at the end gives the same text and ids."""
    ids = encode(" jumps 😀 over the 你好 dog") + [EOS]
    streamed = processor(SamplingParams(stop=["the 你"]))
    text, emitted = joined(feed(streamed, ids))
    whole = processor(SamplingParams(stop=["the 你"]))
    for token_id in ids:
        if not whole.finished:
            whole.append(token_id, None)
    final = whole.take_delta()
    assert final is not None
    assert (final.text, list(final.token_ids)) == (text, emitted) == (" jumps 😀 over ", emitted)


def feed_with_logprobs(choice: ChoiceOutputProcessor, ids: Sequence[int]) -> list[CompletionDelta]:
    """Like `feed`, each token with a logprob whose value encodes its position (-position)."""
    deltas: list[CompletionDelta] = []
    for position, token_id in enumerate(ids):
        if choice.finished:
            break
        choice.append(token_id, TokenLogprob(token_id=token_id, logprob=-float(position)))
        delta = choice.take_delta()
        if delta is not None:
            deltas.append(delta)
    return deltas


def logprob_ids(deltas: Sequence[CompletionDelta]) -> list[int]:
    return [entry.token_id for delta in deltas for entry in delta.logprobs or ()]


def test_skipped_eos_has_no_logprob_but_keeps_its_id() -> None:
    ids = encode(" jumps over") + [IM_END]
    deltas = feed_with_logprobs(processor(SamplingParams(logprobs=True)), ids)
    text, emitted = joined(deltas)
    assert (text, emitted) == (" jumps over", ids)
    assert logprob_ids(deltas) == ids[:-1]
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].logprobs == ()


def test_eos_whose_text_is_emitted_keeps_its_logprob() -> None:
    ids = encode(" hi") + [IM_END]
    deltas = feed_with_logprobs(processor(SamplingParams(logprobs=True, skip_special_tokens=False)), ids)
    assert joined(deltas) == (" hi<|im_end|>", ids)
    assert logprob_ids(deltas) == ids


def test_stop_token_id_has_no_logprob() -> None:
    stop_id = encode(".")[0]
    ids = encode(" jumps.")
    deltas = feed_with_logprobs(processor(SamplingParams(logprobs=True, stop_token_ids=(stop_id,))), ids)
    assert joined(deltas) == (" jumps", ids)
    assert logprob_ids(deltas) == ids[:-1]


def test_eos_that_does_not_stop_keeps_its_logprob() -> None:
    for params in (SamplingParams(logprobs=True, ignore_eos=True), SamplingParams(logprobs=True, min_tokens=2)):
        choice = processor(params)
        deltas = feed_with_logprobs(choice, [EOS, *encode(" a")])
        assert logprob_ids(deltas) == [EOS, *encode(" a")]
        assert choice.finish_reason is None


def test_stop_string_tokens_keep_their_logprobs() -> None:
    choice = processor(SamplingParams(logprobs=True, stop=["mps ov"]))
    deltas = feed_with_logprobs(choice, encode(" jumps over the dog"))
    assert choice.stop_reason == "mps ov"
    assert logprob_ids(deltas) == joined(deltas)[1] == list(choice.output_token_ids)


def test_eos_after_a_split_character_drops_only_its_own_logprob() -> None:
    emoji_ids = encode("😀")
    ids = emoji_ids[:-1] + [EOS]  # the character never completes: its bytes are flushed as U+FFFD
    deltas = feed_with_logprobs(processor(SamplingParams(logprobs=True)), ids)
    assert joined(deltas) == ("\ufffd", ids)
    assert logprob_ids(deltas) == emoji_ids[:-1]
    values = [entry.logprob for delta in deltas for entry in delta.logprobs or ()]
    assert values == [-float(position) for position in range(len(emoji_ids) - 1)]  # the EOS's was dropped
