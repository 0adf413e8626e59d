"""Property test: generated bodies (wrong types, huge numbers, unicode, deep nesting, junk bytes)
thrown at every route never get a 5xx. The fake upstream refuses out-of-range values with
INVALID_ARGUMENT, as the real server does, so every answer must be 2xx or 4xx."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx  # the HTTP client the openai SDK itself depends on
import pytest
from fake_upstream import FakeUpstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.openapi import CHAT_REQUEST, COMPLETION_REQUEST, RESPONSES_REQUEST
from protoserve.translator.server import RunningTranslator, start_translator

EXAMPLES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class BackgroundTranslator:
    """The fake upstream and a translator on their own event loop in a thread, for sync clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.upstream: FakeUpstream | None = None
        self.translator: RunningTranslator | None = None

    async def _start(self) -> None:
        self.upstream = FakeUpstream()
        await self.upstream.start()
        config = TranslatorConfig(upstream=self.upstream.target, max_body_bytes=256 * 1024, max_image_bytes=4096)
        self.translator = await start_translator(config)

    async def _stop(self) -> None:
        assert self.translator is not None and self.upstream is not None
        await self.translator.stop()
        await self.upstream.stop()

    def __enter__(self) -> BackgroundTranslator:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with BackgroundTranslator() as background:
        assert background.translator is not None
        with httpx.Client(base_url=background.translator.url, timeout=30) as http:
            yield http


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            0,
            -1,
            1,
            2**32,
            2**64,
            1e308,
            -1e308,
            "",
            "auto",
            "none",
            "required",
            "text",
            "json_schema",
            "user",
            "assistant",
            "tool",
            "function",
            "\u0000",
            "\ud7ff\U0001f600",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def bodies_for(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Objects using the schema's field names with arbitrary values, plus arbitrary JSON values."""
    objects = st.dictionaries(st.sampled_from(sorted(schema["properties"])), json_values, max_size=6)
    return st.one_of(objects, objects.map(lambda body: {**body, "stream": True}), json_values)


def send_json(client: httpx.Client, path: str, body: Any) -> None:
    response = client.post(
        path, content=json.dumps(body, allow_nan=True).encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code < 500, (path, body, response.text)
    response.read()


@EXAMPLES
@given(body=bodies_for(CHAT_REQUEST))
def test_chat_never_5xx(client: httpx.Client, body: Any) -> None:
    send_json(client, "/v1/chat/completions", body)


@EXAMPLES
@given(body=bodies_for(COMPLETION_REQUEST))
def test_completions_never_5xx(client: httpx.Client, body: Any) -> None:
    send_json(client, "/v1/completions", body)


@EXAMPLES
@given(body=bodies_for(RESPONSES_REQUEST))
def test_responses_never_5xx(client: httpx.Client, body: Any) -> None:
    send_json(client, "/v1/responses", body)


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"])},
        optional={"content": json_values, "tool_calls": json_values, "tool_call_id": json_values},
    ),
    max_size=3,
)


@EXAMPLES
@given(
    messages=messages,
    extra=st.dictionaries(st.sampled_from(sorted(CHAT_REQUEST["properties"])), json_values, max_size=3),
)
def test_chat_with_plausible_messages_never_5xx(client: httpx.Client, messages: list[Any], extra: dict) -> None:
    send_json(client, "/v1/chat/completions", {**extra, "messages": messages})


@settings(max_examples=40, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.integers(min_value=1, max_value=20_000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(min_value=1, max_value=20_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    )
)
def test_junk_bytes_never_5xx(client: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (path, raw[:40])


@settings(max_examples=60, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(["model", "language", "prompt", "response_format", "temperature", "stream", "file"]),
        st.text(max_size=30),
        max_size=6,
    ),
    audio=st.one_of(st.none(), st.binary(max_size=64)),
    path=st.sampled_from(["/v1/audio/transcriptions", "/v1/audio/translations"]),
)
def test_audio_forms_never_5xx(client: httpx.Client, fields: dict[str, str], audio: bytes | None, path: str) -> None:
    files = {"file": ("a.wav", audio, "audio/wav")} if audio is not None else {"placeholder": ("x", b"", "text/plain")}
    data = {name: value for name, value in fields.items() if name != "file"}
    response = client.post(path, data=data, files=files)
    assert response.status_code < 500, (fields, response.text)


@settings(max_examples=60, deadline=None)
@given(model_id=st.text(min_size=1, max_size=40))
def test_model_ids_never_5xx(client: httpx.Client, model_id: str) -> None:
    response = client.get("/v1/models/" + urllib.parse.quote(model_id, safe="/"))
    assert response.status_code < 500, (model_id, response.text)
