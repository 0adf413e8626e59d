"""The llguidance view of a Hugging Face tokenizer, built once per tokenizer and cached.

Building it serializes the whole tokenizer (about a second for a 50k vocabulary), so every
constraint of a model shares one. The cache holds the tokenizer weakly: unloading a model frees it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import llguidance
import llguidance.hf
from protoserve.server.engine.errors import InvalidRequestError

_lock = threading.Lock()
_adapters: dict[int, tuple[weakref.ref[Any], llguidance.LLTokenizer]] = {}


def llguidance_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """The cached `LLTokenizer` of a fast Hugging Face tokenizer (built on first use)."""
    key = id(tokenizer)
    with _lock:
        cached = _adapters.get(key)
        if cached is not None and cached[0]() is tokenizer:
            return cached[1]
        try:
            adapter = llguidance.hf.from_tokenizer(tokenizer)
        except ValueError as error:
            raise InvalidRequestError(
                f"structured output needs a fast (Rust) tokenizer; this model's is {type(tokenizer).__name__}"
            ) from error
        _adapters[key] = (weakref.ref(tokenizer, lambda _: _forget(key)), adapter)
        return adapter


def _forget(key: int) -> None:
    with _lock:
        _adapters.pop(key, None)
