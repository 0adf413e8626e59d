"""The agent's model over the OpenAI-compatible REST API (protoserve's translator, or any server
that speaks `POST /v1/chat/completions` with server-sent events), with aiohttp.

The base URL may be given with or without `/v1` (`http://127.0.0.1:8000` and
`http://127.0.0.1:8000/v1` are the same). Without `model`, the first model of `GET /v1/models` is used.
An error event in the stream (`data: {"error": ...}`) or a stream cut before `data: [DONE]` raises
`ModelCallFailed`.
"""

from __future__ import annotations

import itertools
import json
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import Any

from protoserve.client.agent.model_backends import ModelCallFailed, TextSink
from protoserve.client.agent.turns import AssistantTurn, ToolCallAssembler


def api_base_url(url: str) -> str:
    """`http(s)://host[:port][/prefix]/v1`, or ModelCallFailed for anything that is not an http(s) URL."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ModelCallFailed(f"--openai-url must be http(s)://HOST[:PORT][/v1], got {url!r}")
    try:
        parsed.port  # noqa: B018  (a bad port raises here)
    except ValueError:
        raise ModelCallFailed(f"--openai-url has a bad port: {url!r}") from None
    path = parsed.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


# The longest event line taken: a tool call's arguments arrive whole in one event (the server holds
# a call's pieces until it is complete), so a file-writing call can be megabytes long. The gRPC
# message limit behind the translator is 64 MiB.
MAX_EVENT_LINE_BYTES = 64 * 1024 * 1024


async def event_lines(chunks: AsyncIterable[bytes], max_line_bytes: int = MAX_EVENT_LINE_BYTES) -> AsyncIterator[bytes]:
    """The lines of a server-sent event stream (without their newline), from chunks cut anywhere.
    aiohttp's own line reader refuses lines over 512 KiB; this one takes up to `max_line_bytes`
    and raises ModelCallFailed beyond."""
    pending = bytearray()  # the start of a line whose newline has not come yet
    async for chunk in chunks:
        start, search_from = 0, len(pending)  # the pending part holds no newline: search the chunk only
        pending += chunk
        while (end := pending.find(b"\n", search_from)) >= 0:
            yield bytes(pending[start:end])
            start = search_from = end + 1
        del pending[:start]
        if len(pending) > max_line_bytes:
            raise ModelCallFailed(f"an event of the stream is longer than {max_line_bytes} bytes")
    if pending:
        yield bytes(pending)


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error)) if isinstance(error, Mapping) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:300] or "no body"


class OpenAIModelBackend:
    """Streams chat completions over HTTP. Create it inside the running event loop."""

    def __init__(
        self,
        url: str,
        *,
        model: str = "",
        api_key: str | None = None,
        timeout: float | None = 600.0,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        import aiohttp

        self._base = api_base_url(url)
        self._model = model
        self._sampling = dict(sampling or {})
        headers = {"Accept": "text/event-stream, application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout))
        self._client_error: type[Exception] = aiohttp.ClientError
        self._turn_numbers = itertools.count()

    @property
    def where(self) -> str:
        return self._base

    async def _default_model(self) -> str:
        try:
            async with self._session.get(f"{self._base}/models") as response:
                body = await response.read()
                if response.status != 200:
                    raise ModelCallFailed(
                        f"{self._base}/models answered HTTP {response.status}: {_error_message(body)}"
                    )
        except (self._client_error, TimeoutError) as error:
            raise ModelCallFailed(f"cannot reach {self._base}: {error or type(error).__name__}") from None
        try:
            models = json.loads(body)["data"]
            return str(models[0]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise ModelCallFailed(f"{self._base}/models listed no model; pass --model") from None

    async def reply(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]],
        tool_choice: str,
        on_text: TextSink,
    ) -> AssistantTurn:
        if not self._model:
            self._model = await self._default_model()
        body: dict[str, Any] = {"model": self._model, "messages": list(messages), "stream": True, **self._sampling}
        if tools:
            body["tools"] = list(tools)
            body["tool_choice"] = tool_choice
        assembler = ToolCallAssembler(f"call_{next(self._turn_numbers)}")
        pieces: list[str] = []
        finish_reason: str | None = None
        done = False
        try:
            async with self._session.post(f"{self._base}/chat/completions", json=body) as response:
                if response.status != 200:
                    detail = _error_message(await response.read())
                    raise ModelCallFailed(f"{self._base} answered HTTP {response.status}: {detail}")
                async for raw_line in event_lines(response.content.iter_any()):
                    line = raw_line.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    payload = line[len("data:") :].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    for choice in self._choices(payload):
                        delta = choice.get("delta") or {}
                        content = delta.get("content")
                        if content:
                            pieces.append(str(content))
                            on_text(str(content))
                        for call in delta.get("tool_calls") or ():
                            self._add_call_piece(assembler, call)
                        if choice.get("finish_reason"):
                            finish_reason = str(choice["finish_reason"])
        except (self._client_error, TimeoutError) as error:
            raise ModelCallFailed(f"the connection to {self._base} failed: {error or type(error).__name__}") from None
        if not done:
            raise ModelCallFailed(f"the stream from {self._base} ended without [DONE]")
        return AssistantTurn("".join(pieces), assembler.calls(), finish_reason)

    def _add_call_piece(self, assembler: ToolCallAssembler, call: Any) -> None:
        function = call.get("function") if isinstance(call, Mapping) else None
        index = call.get("index", 0) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(index, int):
            raise ModelCallFailed(f"{self._base} sent a malformed tool-call delta: {str(call)[:200]}")
        assembler.add(index, call.get("id"), function.get("name"), function.get("arguments"))

    def _choices(self, payload: str) -> list[dict[str, Any]]:
        """The first choice's entries of one event (the agent asks for one choice)."""
        try:
            event = json.loads(payload)
        except ValueError:
            raise ModelCallFailed(f"{self._base} sent an event that is not JSON: {payload[:200]!r}") from None
        if not isinstance(event, Mapping):
            raise ModelCallFailed(f"{self._base} sent an unexpected event: {payload[:200]!r}")
        if "error" in event:
            error = event["error"]
            message = error.get("message", error) if isinstance(error, Mapping) else error
            raise ModelCallFailed(f"{self._base}: {message}")
        choices = event.get("choices") or []
        return [dict(choice) for choice in choices if isinstance(choice, Mapping) and choice.get("index", 0) == 0]

    async def close(self) -> None:
        await self._session.close()
