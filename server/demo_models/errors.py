"""Errors raised while fetching and converting the demo models."""

from __future__ import annotations


class DemoModelFetchError(RuntimeError):
    """A demo model could not be downloaded or converted; the message says what to do about it."""


class CTranslate2FormatError(ValueError):
    """A CTranslate2 `model.bin` is truncated, corrupt, or not in the format the reader knows."""
