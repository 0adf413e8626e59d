"""Where `protoserve chat` sends a conversation: the OpenAI REST API (standard library only) or gRPC.

A backend streams the assistant's answer to a list of OpenAI-shaped messages as text pieces and
raises `ChatFailed` with a message a person can act on. Closing the returned iterator early (Ctrl-C)
abandons the request.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, Any]


class ChatFailed(Exception):
    """A reply could not be had; the message says why."""


@dataclass(frozen=True)
class Sampling:
    """The sampling flags of `protoserve chat`; None leaves the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items() if value is not None}


class ChatBackend(Protocol):
    def stream_reply(self, messages: list[Message]) -> Iterator[str]:
        """The answer's text, piece by piece."""
        ...


class OpenAIHttpBackend:
    """Streams `POST /v1/chat/completions` (server-sent events) with http.client; no proxies, no redirects."""

    def __init__(self, url: str, *, model: str, api_key: str | None, sampling: Sampling, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ChatFailed(f"--url must be http(s)://HOST[:PORT], got {url!r}")
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        try:
            self._port = parsed.port
        except ValueError:
            raise ChatFailed(f"--url has a bad port: {url!r}") from None
        self._base_path = parsed.path.rstrip("/")
        if self._base_path.endswith("/v1"):
            self._base_path = self._base_path[: -len("/v1")]
        self._model = model
        self._api_key = api_key
        self._sampling = sampling
        self._timeout = timeout
        self.url = url

    def _connect(self) -> http.client.HTTPConnection:
        connection_type = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return connection_type(self._host, self._port, timeout=self._timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream, application/json", "Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None) -> tuple[Any, Any]:
        connection = self._connect()
        data = json.dumps(body).encode() if body is not None else None
        try:
            connection.request(method, f"{self._base_path}{path}", body=data, headers=self._headers())
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ChatFailed(f"cannot reach {self.url}: {error}") from None
        if response.status != 200:
            detail = _error_detail(response.read())
            connection.close()
            raise ChatFailed(f"{self.url} answered HTTP {response.status}: {detail}")
        return connection, response

    def _default_model(self) -> str:
        connection, response = self._request("GET", "/v1/models", None)
        with contextlib.closing(connection):
            try:
                models = json.loads(response.read())["data"]
            except (ValueError, KeyError, TypeError) as error:
                raise ChatFailed(f"{self.url}/v1/models gave no model list ({error})") from None
        if not models:
            raise ChatFailed(f"{self.url} serves no models")
        return str(models[0]["id"])

    def stream_reply(self, messages: list[Message]) -> Iterator[str]:
        """The reply's text; `timeout` bounds the whole reply (as the gRPC backend's deadline does),
        not only each read."""
        deadline = time.monotonic() + self._timeout
        if not self._model:
            self._model = self._default_model()
        body = {"model": self._model, "messages": messages, "stream": True, **self._sampling.as_dict()}
        connection, response = self._request("POST", "/v1/chat/completions", body)
        return self._read_events(connection, response, deadline)

    def _read_events(self, connection: http.client.HTTPConnection, response: Any, deadline: float) -> Iterator[str]:
        with contextlib.closing(connection):
            try:
                for raw_line in response:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ChatFailed(f"no whole reply from {self.url} within {self._timeout:g} s (--timeout)")
                    if connection.sock is not None:
                        connection.sock.settimeout(left)  # a stalled read ends at the deadline too
                    line = raw_line.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    payload = line[len("data:") :].strip()
                    if payload == "[DONE]":
                        return
                    yield from _event_text(payload)
            except TimeoutError:
                raise ChatFailed(f"no whole reply from {self.url} within {self._timeout:g} s (--timeout)") from None
            except (OSError, http.client.HTTPException) as error:
                raise ChatFailed(f"the connection to {self.url} broke: {error}") from None
        raise ChatFailed(f"the stream from {self.url} ended without [DONE]")


def _error_detail(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error["message"]) if isinstance(error, Mapping) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:300] or "no body"


def _event_text(payload: str) -> Iterator[str]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise ChatFailed(f"the server sent an event that is not JSON: {payload[:200]!r}") from None
    if not isinstance(event, Mapping):
        raise ChatFailed(f"the server sent an unexpected event: {payload[:200]!r}")
    if "error" in event:
        error = event["error"]
        raise ChatFailed(str(error.get("message", error)) if isinstance(error, Mapping) else str(error))
    for choice in event.get("choices") or ():
        content = (choice.get("delta") or {}).get("content") if isinstance(choice, Mapping) else None
        if content:
            yield str(content)


class GrpcBackend:
    """Streams `GenerationService.Chat` with the typed client."""

    def __init__(self, target: str, *, model: str, api_key: str | None, sampling: Sampling, timeout: float) -> None:
        from protoserve.client import ProtoserveClient

        self._client = ProtoserveClient(target, api_key=api_key, timeout=timeout)
        self._model = model
        self._sampling = sampling
        self.target = target

    def stream_reply(self, messages: list[Message]) -> Iterator[str]:
        from protoserve.client import ProtoserveError

        try:
            deltas = self._client.chat(messages, model=self._model, stream=True, **self._sampling.as_dict())
            with contextlib.closing(deltas):  # closing this generator early cancels the call
                for delta in deltas:
                    if delta.text:
                        yield delta.text
        except ProtoserveError as error:
            raise ChatFailed(f"{self.target}: {error}") from None
