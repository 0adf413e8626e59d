"""Errors the engine raises to its callers. The server maps each onto one gRPC status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine reports to a caller."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as asked (bad parameter). Maps to INVALID_ARGUMENT."""


class PromptTooLongError(InvalidRequestError):
    """Prompt plus requested output exceed the model's context length."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"this model's context length is {context_length} tokens, but the request asks for "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt plus {max_tokens} to generate); "
            "shorten the prompt or lower max_tokens"
        )


class EngineOverloadedError(EngineError):
    """The waiting queue is full. Maps to RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, waiting: int, limit: int, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"server overloaded: {waiting} requests waiting (limit {limit}); retry later")


class KVCacheExhaustedError(EngineError):
    """The request can never fit in the KV cache, even alone. Maps to RESOURCE_EXHAUSTED."""


class EngineDeadError(EngineError):
    """The engine loop stopped after an unrecoverable failure. Maps to UNAVAILABLE."""


class RequestFailedError(EngineError):
    """A step failed while running this request; other requests were not affected. Maps to INTERNAL."""


class UnsupportedModelError(EngineError):
    """The engine cannot drive this architecture (raised at load time)."""


class ModelLoadError(EngineError):
    """The model could not be loaded as asked (missing folder, bad dtype/device/quantization option)."""
