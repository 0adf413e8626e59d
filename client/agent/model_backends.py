"""Where the agent's assistant turns come from: protoserve's gRPC `Chat` stream, or (in
`openai_backend.py`) the OpenAI-compatible REST API of the translator.

A backend sends the conversation and the tools, streams the answer's text to `on_text` as it
arrives, and returns the whole turn. Any failure (unreachable server, refused request, an error
in the middle of the stream) raises `ModelCallFailed` with a message a person can act on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from protoserve.client.agent.turns import AssistantTurn, ToolCallAssembler

TextSink = Callable[[str], None]


class ModelCallFailed(Exception):
    """The model could not answer this turn; the message says why."""


class ModelBackend(Protocol):
    """One assistant turn at a time. `tool_choice` is "auto", "none" or "required"; `tools` are
    OpenAI-shaped function tools (empty: the request carries no tools and no tool_choice)."""

    async def reply(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]],
        tool_choice: str,
        on_text: TextSink,
    ) -> AssistantTurn: ...

    async def close(self) -> None: ...

    @property
    def where(self) -> str:
        """The server, for messages (`127.0.0.1:50051`, `http://127.0.0.1:8000/v1`)."""
        ...


class GrpcModelBackend:
    """Streams `GenerationService.Chat` with the async typed client. Create it inside the running loop."""

    def __init__(
        self,
        target: str,
        *,
        model: str = "",
        api_key: str | None = None,
        timeout: float | None = 600.0,
        sampling: dict[str, Any] | None = None,
        client: Any = None,
    ) -> None:
        from protoserve.client import AsyncProtoserveClient

        self._client = client if client is not None else AsyncProtoserveClient(target, api_key=api_key)
        self._owns_client = client is None
        self._target = target
        self._model = model
        self._timeout = timeout
        self._sampling = dict(sampling or {})
        self._turn_numbers = itertools.count()

    @property
    def where(self) -> str:
        return self._target

    async def reply(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]],
        tool_choice: str,
        on_text: TextSink,
    ) -> AssistantTurn:
        from protoserve.client import ProtoserveError

        assembler = ToolCallAssembler(f"call_{next(self._turn_numbers)}")
        pieces: list[str] = []
        finish_reason: str | None = None
        tool_options: dict[str, Any] = {"tools": list(tools), "tool_choice": tool_choice} if tools else {}
        try:
            stream = self._client.chat(
                list(messages), model=self._model, stream=True, timeout=self._timeout, **tool_options, **self._sampling
            )
            async with stream:
                async for delta in stream:
                    if delta.index != 0:
                        continue  # the agent asks for one choice
                    if delta.text:
                        pieces.append(delta.text)
                        on_text(delta.text)
                    for piece in delta.tool_calls:
                        assembler.add(piece.index, piece.id, piece.name, piece.arguments)
                    if delta.finish_reason is not None:
                        finish_reason = delta.finish_reason
        except ProtoserveError as error:
            raise ModelCallFailed(f"{self._target}: {error}") from None
        if finish_reason == "error":
            raise ModelCallFailed(f"{self._target}: the model failed while answering (finish_reason error)")
        if finish_reason is None:
            raise ModelCallFailed(f"{self._target}: the answer stream ended before the model finished")
        return AssistantTurn("".join(pieces), assembler.calls(), finish_reason)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()
