"""Temperature fallback and silence detection for one whisper window, as OpenAI's whisper does them.

A window is first decoded at the caller's temperature (0, greedy, by default). A decode that looks
stuck is retried at increasing temperatures, and the first acceptable decode is kept; when none is
acceptable, the decode at the highest temperature is kept (there is nothing better). The thresholds
are whisper's own defaults (`whisper.transcribe`):

- `COMPRESSION_RATIO_THRESHOLD` = 2.4: the text's length over its zlib (gzip's deflate) compressed
  length. A decode above it repeats itself (the decoder is looping), so it is retried.
- `LOGPROB_THRESHOLD` = -1.0: the decode's mean log-probability per token, end-of-text included.
  A decode below it is unsure of itself, so it is retried.
- `NO_SPEECH_THRESHOLD` = 0.6: the probability of the no-speech token at the start-of-transcript
  position (the first decoding step). A window above it whose decode is also below
  `LOGPROB_THRESHOLD` (or whatever its decode, when that check is off) is silence: it is not
  retried and gives no segment; transcription goes on with the next window.
- `TEMPERATURE_INCREMENT` = 0.2 up to `MAX_FALLBACK_TEMPERATURE` = 1.0: the retries. From greedy
  that is 0, 0.2, 0.4, 0.6, 0.8, 1.0; a caller's temperature above 0 is where the schedule starts
  (0.3 gives 0.3, 0.5, 0.7, 0.9), and one above 1.0 is tried alone.

A threshold set to None turns its check off; `NO_FALLBACK` turns all of them off (one decode per
window at the caller's temperature, no window skipped as silence).

This module holds no torch: it judges decodes that a caller-supplied function produces.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protoserve.server.transcription.whisper_decoding import DecodedWindow

COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
TEMPERATURE_INCREMENT = 0.2
MAX_FALLBACK_TEMPERATURE = 1.0


def _check_optional_number(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or None, not {value!r}")


@dataclass(frozen=True)
class FallbackPolicy:
    """When a window's decode is retried hotter or dropped as silence. See the module docstring."""

    compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD
    logprob_threshold: float | None = LOGPROB_THRESHOLD
    no_speech_threshold: float | None = NO_SPEECH_THRESHOLD
    temperature_increment: float = TEMPERATURE_INCREMENT
    max_temperature: float = MAX_FALLBACK_TEMPERATURE

    def __post_init__(self) -> None:
        _check_optional_number("compression_ratio_threshold", self.compression_ratio_threshold)
        _check_optional_number("logprob_threshold", self.logprob_threshold)
        _check_optional_number("no_speech_threshold", self.no_speech_threshold)
        _check_optional_number("temperature_increment", self.temperature_increment)
        _check_optional_number("max_temperature", self.max_temperature)
        if not self.temperature_increment > 0:
            raise ValueError(f"temperature_increment must be above 0, not {self.temperature_increment}")
        if self.max_temperature < 0:
            raise ValueError(f"max_temperature must be 0 or more, not {self.max_temperature}")

    @property
    def retries(self) -> bool:
        """Whether any check can ask for a retry."""
        return self.compression_ratio_threshold is not None or self.logprob_threshold is not None

    def temperatures(self, start: float) -> tuple[float, ...]:
        """The temperatures to try, in order: `start`, then up by the increment to the maximum."""
        if not self.retries or start >= self.max_temperature:
            return (start,)
        count = int(math.floor((self.max_temperature - start) / self.temperature_increment + 1e-6)) + 1
        return tuple(round(start + step * self.temperature_increment, 6) for step in range(count))


NO_FALLBACK = FallbackPolicy(compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None)


def compression_ratio(text: str) -> float:
    """Length of the UTF-8 text over its zlib-compressed length; 0 for empty text."""
    encoded = text.encode("utf-8")
    return len(encoded) / len(zlib.compress(encoded)) if encoded else 0.0


@dataclass(frozen=True)
class JudgedDecode:
    """The decode kept for a window, the temperature that made it, and what the checks saw."""

    decoded: DecodedWindow
    temperature: float
    text: str
    compression_ratio: float
    is_silence: bool
    attempts: int  # how many decodes were made

    @property
    def avg_logprob(self) -> float:
        return self.decoded.avg_logprob

    @property
    def no_speech_probability(self) -> float:
        return self.decoded.no_speech_probability


def _is_silent(decoded: DecodedWindow, policy: FallbackPolicy) -> bool:
    """A high no-speech probability, and (when that check is on) a low-confidence decode."""
    if policy.no_speech_threshold is None or decoded.no_speech_probability <= policy.no_speech_threshold:
        return False
    return policy.logprob_threshold is None or decoded.avg_logprob < policy.logprob_threshold


def _looks_stuck(judged: JudgedDecode, policy: FallbackPolicy) -> bool:
    threshold = policy.compression_ratio_threshold
    too_repetitive = threshold is not None and judged.compression_ratio > threshold
    too_unsure = policy.logprob_threshold is not None and judged.avg_logprob < policy.logprob_threshold
    return too_repetitive or too_unsure


def _judge(
    decode: Callable[[float], DecodedWindow],
    text_of: Callable[[DecodedWindow], str],
    policy: FallbackPolicy,
    temperature: float,
    attempt: int,
) -> JudgedDecode:
    decoded = decode(temperature)
    text = text_of(decoded)
    return JudgedDecode(decoded, temperature, text, compression_ratio(text), _is_silent(decoded, policy), attempt)


def decode_with_fallback(
    decode: Callable[[float], DecodedWindow],
    text_of: Callable[[DecodedWindow], str],
    policy: FallbackPolicy,
    start_temperature: float,
) -> JudgedDecode:
    """Decode a window with `decode(temperature)` until a decode is acceptable or silent, or the
    schedule is spent (the last decode is kept); `text_of` gives a decode's text."""
    temperatures = policy.temperatures(start_temperature)
    judged = _judge(decode, text_of, policy, temperatures[0], 1)
    for attempt, temperature in enumerate(temperatures[1:], start=2):
        if judged.is_silence or not _looks_stuck(judged, policy):
            break
        judged = _judge(decode, text_of, policy, temperature, attempt)
    return judged
