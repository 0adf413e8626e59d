"""Per-request limits the generation and transcription services enforce before any work is scheduled.

Every limit exists so that one request cannot take an unfair share of the server (memory, CPU time
in the chat template or the tokenizer, KV cache) or crash it. A request over a limit is refused
with INVALID_ARGUMENT and a message that names the field, the value and the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """The limits of one request. Defaults suit a public-facing server; raise them in `ServerConfig`."""

    max_n: int = 8
    """Most choices (`n`) one request may ask for; each choice costs its own KV blocks and decode work."""

    max_stop_strings: int = 16
    """Most stop strings; each is matched against every new piece of text."""

    max_stop_length: int = 256
    """Longest stop string, in characters."""

    max_logit_bias: int = 300
    """Most entries in `logit_bias` (OpenAI's own limit)."""

    max_top_logprobs: int = 20
    """Most alternatives per position in `top_logprobs` (OpenAI's own limit)."""

    max_messages: int = 1024
    """Most messages in one conversation."""

    max_message_chars: int = 1_000_000
    """Longest text of one message (all its text parts together), in characters."""

    max_prompt_chars: int = 4_000_000
    """Longest prompt, in characters: a raw prompt's text, or a conversation's rendered chat template."""

    max_images: int = 8
    """Most images in one conversation."""

    max_image_bytes: int = 20 * MIB
    """Largest encoded image (after base64 decoding or download)."""

    max_audio_bytes: int = 25 * MIB
    """Largest encoded audio upload (OpenAI's own limit)."""

    max_audio_seconds: float = 30 * 60.0
    """Longest audio after decoding, in seconds."""

    max_tools: int = 128
    """Most tools offered in one chat request (OpenAI's own limit)."""

    max_tool_schema_chars: int = 100_000
    """Largest JSON of all tools' definitions together, in characters."""

    max_template_kwargs_chars: int = 16_384
    """Largest JSON of `chat_template_kwargs`, in characters: they reach the template as variables."""

    chat_template_timeout_s: float = 10.0
    """Longest time rendering one chat template may take before the request is refused."""

    max_request_id_chars: int = 256
    """Longest caller-chosen request id; it is echoed back and written to logs."""

    default_max_tokens: int | None = None
    """max_tokens when the request sets none; None means up to the model's context length."""

    def __post_init__(self) -> None:
        for name in (
            "max_n",
            "max_stop_strings",
            "max_stop_length",
            "max_logit_bias",
            "max_messages",
            "max_message_chars",
            "max_prompt_chars",
            "max_images",
            "max_image_bytes",
            "max_audio_bytes",
            "max_tools",
            "max_tool_schema_chars",
            "max_template_kwargs_chars",
            "max_request_id_chars",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"RequestLimits.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.max_top_logprobs <= 20:
            raise ValueError(f"RequestLimits.max_top_logprobs must be in [0, 20], got {self.max_top_logprobs}")
        if self.max_audio_seconds <= 0 or self.chat_template_timeout_s <= 0:
            raise ValueError("RequestLimits.max_audio_seconds and chat_template_timeout_s must be > 0")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"RequestLimits.default_max_tokens must be >= 1 or None, got {self.default_max_tokens}")
