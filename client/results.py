"""What the client returns: plain frozen dataclasses. Protobuf never leaves the client.

Finish reasons are OpenAI's strings: "stop", "length", "tool_calls", "abort", "error", or None
while a choice is still running.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    """Token accounting of one request (all choices)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class TopLogprob:
    """One alternative token at a position."""

    token: str
    token_id: int
    logprob: float
    token_bytes: bytes = b""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and its most likely alternatives (most likely first)."""

    token: str
    token_id: int
    logprob: float
    token_bytes: bytes = b""
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCall:
    """A whole tool call; `arguments` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str
    type: str = "function"


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call: the first piece of a call has `id` and `name`."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Choice:
    """One whole choice of a reply."""

    index: int
    text: str
    reasoning: str
    token_ids: tuple[int, ...]
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str | None
    stop_reason: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Reply:
    """The whole answer to `chat` or `generate`. The shortcuts read the first choice."""

    request_id: str
    model: str
    created: int
    choices: tuple[Choice, ...]
    usage: Usage | None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def reasoning(self) -> str:
        return self.choices[0].reasoning if self.choices else ""

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.choices[0].tool_calls if self.choices else ()

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.choices[0].token_ids if self.choices else ()


@dataclass(frozen=True)
class Delta:
    """What one choice produced since the previous delta of a stream.

    `usage` is set on the stream's last delta only; when the server sends usage in a message of
    its own, that last delta has no text.
    """

    request_id: str
    model: str
    index: int
    text: str
    reasoning: str
    token_ids: tuple[int, ...]
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str | None = None
    stop_reason: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    usage: Usage | None = None


@dataclass(frozen=True)
class Segment:
    """A stretch of recognised speech; times in seconds from the start of the audio."""

    id: int
    start: float
    end: float
    text: str
    token_ids: tuple[int, ...] = ()
    avg_logprob: float = 0.0


@dataclass(frozen=True)
class TranscriptDelta:
    """One message of a streamed transcription. The last has `done` and the whole `text`."""

    request_id: str
    model: str
    segments: tuple[Segment, ...]
    text_delta: str
    done: bool
    text: str = ""
    language: str = ""
    duration: float = 0.0


@dataclass(frozen=True)
class Transcript:
    """A whole transcription."""

    request_id: str
    model: str
    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class ModelInfo:
    """A model the server can answer with. `modalities` holds "text", "image", "audio"."""

    id: str
    owned_by: str
    created: int
    modalities: tuple[str, ...]
    context_length: int
    quantization: str
    loaded: bool
    architecture: str
    dtype: str
    device: str
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class Tokens:
    """A prompt's tokens as the model sees them, and the model's context length."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    context_length: int
