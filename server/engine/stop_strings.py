"""Stop strings over streamed text: release what can no longer start a stop string, hold the rest.

Which match wins does not depend on how the text was split into pieces: the stop string that ends
first in the text wins (it is the one a character-by-character stream would see first); among
those ending at the same place, the one starting first (the longest). The stop string itself and
everything after it are never released.
"""

from __future__ import annotations

from collections.abc import Sequence

from protoserve.server.engine.errors import InvalidRequestError


class StopStringMatcher:
    """Finds the first stop string in a stream of text pieces.

    Invariant: `_held` is the longest suffix of the text fed so far that is a proper prefix of some
    stop string, so it is always shorter than the longest stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        for stop in stops:
            if not isinstance(stop, str):
                raise InvalidRequestError(f"stop strings must be strings, got {type(stop).__name__}")
            if not stop:
                raise InvalidRequestError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._proper_prefixes = {stop[:length] for stop in self._stops for length in range(1, len(stop))}
        self._longest_prefix = max((len(stop) - 1 for stop in self._stops), default=0)
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add a piece of text. Returns the text now safe to release and the stop string that
        matched (None while none has). After a match, further text is ignored."""
        if self.matched is not None:
            return "", None
        if not self._stops:
            return text, None
        buffer = self._held + text
        match = self._first_match(buffer)
        if match is not None:
            start, stop = match
            self._held = ""
            self.matched = stop
            return buffer[:start], stop
        held_length = self._held_suffix_length(buffer)
        self._held = buffer[len(buffer) - held_length :]
        return buffer[: len(buffer) - held_length], None

    def flush(self) -> str:
        """Release the held text, when the choice ends for another reason than a stop string."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buffer.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _held_suffix_length(self, buffer: str) -> int:
        for length in range(min(len(buffer), self._longest_prefix), 0, -1):
            if buffer[-length:] in self._proper_prefixes:
                return length
        return 0
