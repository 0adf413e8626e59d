"""API key files, read alike by `serve`, `translate` and `up`: one key a line, stripped; blank lines
and lines starting with '#' are skipped."""

from __future__ import annotations


def api_keys_in(text: str) -> list[str]:
    """The keys of an API key file's text, in order."""
    keys = [line.strip() for line in text.splitlines()]
    return [key for key in keys if key and not key.startswith("#")]
