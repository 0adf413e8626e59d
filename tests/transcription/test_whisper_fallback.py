"""Temperature fallback and silence judgement on hand-made decodes (no model)."""

from __future__ import annotations

import math

import pytest
from protoserve.server.transcription.whisper_decoding import DecodedWindow
from protoserve.server.transcription.whisper_fallback import (
    COMPRESSION_RATIO_THRESHOLD,
    NO_FALLBACK,
    FallbackPolicy,
    JudgedDecode,
    compression_ratio,
    decode_with_fallback,
)

SENTENCE = " The quick brown fox jumps over the lazy dog."
LOOPING = " the the the the" * 30


def decoded(avg_logprob: float, no_speech: float = 0.0, tokens: int = 4) -> DecodedWindow:
    """A decode of `tokens` tokens plus end-of-text whose mean log-probability is `avg_logprob`."""
    return DecodedWindow(
        token_ids=tuple(range(tokens)),
        logprobs=tuple(avg_logprob for _ in range(tokens)),
        end_of_text_logprob=avg_logprob,
        no_speech_probability=no_speech,
    )


class FakeDecoder:
    """Returns planned (decode, text) pairs in turn and records the temperatures asked for."""

    def __init__(self, plan: list[tuple[DecodedWindow, str]]) -> None:
        self.plan = plan
        self.temperatures: list[float] = []
        self.texts: dict[int, str] = {}

    def decode(self, temperature: float) -> DecodedWindow:
        window, text = self.plan[min(len(self.temperatures), len(self.plan) - 1)]
        self.temperatures.append(temperature)
        self.texts[id(window)] = text
        return window

    def text_of(self, window: DecodedWindow) -> str:
        return self.texts[id(window)]


def run(
    plan: list[tuple[DecodedWindow, str]], policy: FallbackPolicy | None = None, start: float = 0.0
) -> tuple[JudgedDecode, list[float]]:
    decoder = FakeDecoder(plan)
    judged = decode_with_fallback(decoder.decode, decoder.text_of, policy or FallbackPolicy(), start)
    return judged, decoder.temperatures


def test_temperature_schedule() -> None:
    policy = FallbackPolicy()
    assert policy.temperatures(0.0) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert policy.temperatures(0.3) == (0.3, 0.5, 0.7, 0.9)
    assert policy.temperatures(1.0) == (1.0,)
    assert policy.temperatures(1.5) == (1.5,)
    assert NO_FALLBACK.temperatures(0.4) == (0.4,)
    assert FallbackPolicy(temperature_increment=0.5, max_temperature=2.0).temperatures(0.0) == (0.0, 0.5, 1.0, 1.5, 2.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature_increment": 0.0}, "temperature_increment must be above 0"),
        ({"temperature_increment": -0.2}, "temperature_increment must be above 0"),
        ({"max_temperature": -1.0}, "max_temperature"),
        ({"logprob_threshold": math.nan}, "logprob_threshold must be a finite number"),
        ({"compression_ratio_threshold": math.inf}, "compression_ratio_threshold"),
        ({"no_speech_threshold": "0.6"}, "no_speech_threshold"),
        ({"no_speech_threshold": True}, "no_speech_threshold"),
    ],
)
def test_bad_policies_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FallbackPolicy(**fields)  # type: ignore[arg-type]


def test_compression_ratio_flags_repetition_only() -> None:
    assert compression_ratio(LOOPING) > COMPRESSION_RATIO_THRESHOLD
    assert compression_ratio(SENTENCE) < COMPRESSION_RATIO_THRESHOLD
    assert compression_ratio("") == 0.0
    assert compression_ratio("héllo wörld ✓") > 0


def test_average_logprob_counts_end_of_text_as_a_token() -> None:
    window = DecodedWindow(token_ids=(1, 2), logprobs=(-1.0, -2.0), end_of_text_logprob=-3.0)
    assert window.avg_logprob == pytest.approx(-2.0)
    cut_off = DecodedWindow(token_ids=(1, 2), logprobs=(-1.0, -2.0))  # no end-of-text: ran out of room
    assert cut_off.avg_logprob == pytest.approx(-1.0)
    assert DecodedWindow(token_ids=(), logprobs=()).avg_logprob == 0.0


def test_a_confident_greedy_decode_is_kept_at_once() -> None:
    judged, temperatures = run([(decoded(-0.3), SENTENCE)])
    assert temperatures == [0.0]
    assert (judged.temperature, judged.attempts, judged.is_silence) == (0.0, 1, False)
    assert judged.text == SENTENCE and judged.avg_logprob == pytest.approx(-0.3)


def test_an_unsure_decode_is_retried_hotter_until_acceptable() -> None:
    plan = [(decoded(-2.5), SENTENCE), (decoded(-1.5), SENTENCE), (decoded(-0.5), " fine")]
    judged, temperatures = run(plan)
    assert temperatures == [0.0, 0.2, 0.4]
    assert (judged.temperature, judged.text, judged.attempts) == (0.4, " fine", 3)


def test_a_looping_decode_is_retried_even_when_confident() -> None:
    judged, temperatures = run([(decoded(-0.1), LOOPING), (decoded(-0.4), SENTENCE)])
    assert temperatures == [0.0, 0.2]
    assert judged.text == SENTENCE and judged.compression_ratio < COMPRESSION_RATIO_THRESHOLD


def test_when_nothing_is_acceptable_the_hottest_decode_is_kept() -> None:
    judged, temperatures = run([(decoded(-3.0), LOOPING)])
    assert temperatures == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert (judged.temperature, judged.attempts, judged.is_silence) == (1.0, 6, False)


def test_the_callers_temperature_starts_the_schedule() -> None:
    _, temperatures = run([(decoded(-3.0), SENTENCE)], start=0.5)
    assert temperatures == [0.5, 0.7, 0.9]
    _, temperatures = run([(decoded(-3.0), SENTENCE)], start=1.2)
    assert temperatures == [1.2]


def test_silence_is_not_retried() -> None:
    judged, temperatures = run([(decoded(-1.6, no_speech=0.9), " you")])
    assert temperatures == [0.0]
    assert judged.is_silence and judged.no_speech_probability == 0.9


def test_likely_silence_with_a_confident_decode_is_speech() -> None:
    judged, _ = run([(decoded(-0.5, no_speech=0.9), SENTENCE)])
    assert not judged.is_silence
    judged, _ = run([(decoded(-1.5, no_speech=0.6), SENTENCE), (decoded(-0.5), SENTENCE)])
    assert not judged.is_silence and judged.attempts == 2  # 0.6 is not above the threshold


def test_thresholds_can_be_turned_off() -> None:
    judged, temperatures = run([(decoded(-5.0, no_speech=0.99), LOOPING)], policy=NO_FALLBACK)
    assert temperatures == [0.0] and not judged.is_silence
    no_logprob_check = FallbackPolicy(logprob_threshold=None)
    judged, temperatures = run([(decoded(-5.0), SENTENCE)], policy=no_logprob_check)
    assert temperatures == [0.0]
    judged, _ = run([(decoded(-0.1, no_speech=0.99), SENTENCE)], policy=no_logprob_check)
    assert judged.is_silence  # without the logprob check, the no-speech probability decides alone
