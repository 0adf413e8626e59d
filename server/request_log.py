"""One log line per request, and the request id every call carries.

`RequestLogInterceptor` wraps every call (health and reflection excepted): it gives a request
without a caller-chosen id one (`req-<uuid>`, written into `request.options.request_id` before the
servicer sees it, so servicers always echo a non-empty id), times the call, and logs at INFO one
line with id, model, rpc, status, tokens, duration and the caller's end-user id (`options.user`,
OpenAI's `user`, for abuse tracing). Servicers add what only they know (the
model that answered, token counts) to the current call's `RequestRecord` through `note_model` and
`note_tokens`; `ServerMetrics` does so for them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from protoserve.server.errors import status_for_exception
from protoserve.server.interceptors import Context, around_call, is_infrastructure_method

logger = logging.getLogger("protoserve.server.requests")


MAX_LOGGED_FIELD_CHARS = 128


def printable(text: str) -> str:
    """`text` safe for one log line: control characters escaped, cut to a bounded length
    (request ids and model names come from callers and must not forge or flood log lines)."""
    if len(text) > MAX_LOGGED_FIELD_CHARS:
        text = text[:MAX_LOGGED_FIELD_CHARS] + "..."
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


@dataclass
class RequestRecord:
    """What the log line of one call says. Mutable: filled in while the call runs."""

    rpc: str
    request_id: str = ""
    model: str = ""
    user: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


_current_record: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "protoserve_request_record", default=None
)


def current_record() -> RequestRecord | None:
    """The record of the call running in this task, if any."""
    return _current_record.get()


def current_request_id() -> str:
    """The id of the call running in this task (made by the interceptor), or a fresh one."""
    record = _current_record.get()
    return record.request_id if record is not None and record.request_id else new_request_id()


def note_model(model: str) -> None:
    record = _current_record.get()
    if record is not None and model:
        record.model = model


def note_tokens(prompt: int, completion: int) -> None:
    record = _current_record.get()
    if record is not None:
        record.prompt_tokens += prompt
        record.completion_tokens += completion


def assign_request_id(request: Any) -> str:
    """The request's `options.request_id`, after setting a fresh one when it was empty ('' for
    messages without options)."""
    try:
        if not request.HasField("options"):
            request.options.SetInParent()
        options = request.options
    except (AttributeError, ValueError):
        return ""
    if not options.request_id:
        options.request_id = new_request_id()
    return str(options.request_id)


def end_user_id(request: Any) -> str:
    """The caller's end-user id (`options.user`), at most 128 characters, or ''."""
    options = getattr(request, "options", None)
    return str(getattr(options, "user", "") or "")[:128]


def status_name(context: Context, error: BaseException | None) -> str:
    """The name of the status a call ended with, given the exception that ended it (None: returned)."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    if error is not None and not isinstance(error, (grpc.aio.AbortError, GeneratorExit)):
        # Not mapped yet: say what `abort_for_exception` will map it to.
        return status_for_exception(error, "").code.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio keeps the cygrpc integer once a call was aborted
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return "OK"


class RequestLogInterceptor(grpc.aio.ServerInterceptor):
    """Assigns request ids and logs one INFO line per finished call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_infrastructure_method(method) or handler.request_streaming:
            return handler
        rpc = method.rsplit("/", 1)[-1]

        @asynccontextmanager
        async def logged(request: Any, context: Context) -> AsyncIterator[None]:
            record = RequestRecord(rpc=rpc, request_id=assign_request_id(request) or new_request_id())
            record.model = str(getattr(request, "model", "") or "")
            record.user = end_user_id(request)
            # Each call runs in its own task, so the value never outlives the call.
            _current_record.set(record)
            started = time.monotonic()
            error: BaseException | None = None
            try:
                yield
            except BaseException as exc:
                error = exc
                raise
            finally:
                logger.info(
                    "request %s model=%s rpc=%s status=%s prompt_tokens=%d completion_tokens=%d duration=%.3fs user=%s",
                    printable(record.request_id) or "-",
                    printable(record.model) or "default",
                    record.rpc,
                    status_name(context, error),
                    record.prompt_tokens,
                    record.completion_tokens,
                    time.monotonic() - started,
                    printable(record.user) or "-",
                )

        return around_call(handler, logged)  # type: ignore[return-value]
