"""Server-sent events out: `data: JSON` lines (with an optional `event:` name) and `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def encode_event(data: dict[str, Any], event: str | None = None) -> bytes:
    """One SSE event; JSON is compact and keeps non-ASCII text as UTF-8."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


DONE_EVENT = b"data: [DONE]\n\n"


class EventStream:
    """An SSE response: `start` sends the headers (status 200), `send` one event, `close` ends it."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies must not hold events back
            },
        )

    async def start(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, data: dict[str, Any], event: str | None = None) -> None:
        await self.response.write(encode_event(data, event))

    async def send_all(self, events: list[tuple[dict[str, Any], str | None]]) -> None:
        """Several events in one write (one upstream message's worth): one await, one socket send."""
        if events:
            await self.response.write(b"".join(encode_event(data, event) for data, event in events))

    async def send_done(self) -> None:
        await self.response.write(DONE_EVENT)

    async def close(self) -> web.StreamResponse:
        await self.response.write_eof()
        return self.response
