"""A step-by-step progress bar on stderr for the fetch-and-convert work."""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm


class StepProgress:
    """Counts named steps on one tqdm bar (stderr); a no-op when `enabled` is False.

    Each `advance(description)` marks the previous step done and shows what runs next, so a
    slow step (GGUF dequantisation) is visible while it runs.
    """

    def __init__(self, total_steps: int, *, enabled: bool) -> None:
        self._bar = tqdm(
            total=total_steps,
            disable=not enabled,
            file=sys.stderr,
            unit="step",
            bar_format="{desc:<58} {n_fmt}/{total_fmt} [{elapsed}]",
        )
        self._started = False
        self.enabled = enabled

    def advance(self, description: str) -> None:
        """Finish the running step (if any) and start the one called `description`."""
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_description_str(description)

    def message(self, text: str) -> None:
        """Print a line above the bar without breaking it."""
        if not self._bar.disable:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        """Count the last step as done and release the terminal line."""
        if self._started:
            self._bar.update(1)
            self._started = False
        self._bar.close()

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._bar.close()
