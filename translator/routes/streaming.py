"""Relaying an upstream gRPC stream as SSE, shared by every streaming route.

The first upstream message is awaited before the HTTP response starts, so an upstream that refuses
the request (bad argument, unknown model, overload) gets its real HTTP status. After that the
status is 200 and any failure becomes a final `data: {"error": ...}` event, then `data: [DONE]`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from aiohttp import web
from protoserve.translator.errors import ApiError
from protoserve.translator.sse import EventStream
from protoserve.translator.state import METRICS_KEY

logger = logging.getLogger(__name__)

Message = TypeVar("Message")
Event = dict[str, Any]


def error_event(error: ApiError) -> Event:
    """The default in-stream error event: the OpenAI error body."""
    return error.body()


async def relay(
    request: web.Request,
    messages: AsyncGenerator[Message, None],
    to_events: Callable[[Message], list[Event]],
    finish: Callable[[], list[Event]],
    *,
    named_events: bool = False,
    done_marker: bool = True,
    on_error: Callable[[ApiError], Event] = error_event,
) -> web.StreamResponse:
    """Send `to_events(message)` for every upstream message, then `finish()`, then `[DONE]` when
    `done_marker`. With `named_events` each event also gets an `event:` line naming its `type`."""
    try:
        first_events = to_events(await anext(messages))
    except StopAsyncIteration:
        first_events = []
    except BaseException:
        await messages.aclose()
        raise
    stream = EventStream(request)
    event_name: Callable[[Event], str | None] = (lambda event: event.get("type")) if named_events else (lambda _: None)
    metrics = request.app[METRICS_KEY]
    metrics.streams_in_flight.inc()
    try:
        await stream.start()
        failure: ApiError | None = None
        try:
            await stream.send_all([(event, event_name(event)) for event in first_events])
            async for message in messages:
                await stream.send_all([(event, event_name(event)) for event in to_events(message)])
            await stream.send_all([(event, event_name(event)) for event in finish()])
        except ApiError as error:
            failure = error
        except OSError:  # the client went away (ConnectionResetError): nothing more can be sent
            raise
        except Exception:
            logger.exception("failed while streaming %s", request.path)
            failure = ApiError(500, "the translator failed while streaming this response")
        if failure is not None:
            await stream.send(on_error(failure), "error" if named_events else None)
        if failure is not None or done_marker:
            await stream.send_done()
        return await stream.close()
    finally:
        metrics.streams_in_flight.dec()
        await messages.aclose()
