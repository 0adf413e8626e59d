"""The one place that turns exceptions into gRPC statuses.

Every servicer and interceptor reports failures through `abort_for_exception` (or the
`rpc_errors` context manager around a method body), so a given exception always reaches callers
with the same code and message. Messages of caller mistakes are passed through (they say what to
fix); anything unexpected becomes INTERNAL with only a request id, and its traceback is logged
server-side under that id. Memory addresses, file paths of the server's code and stack traces
never reach a client.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio
from protoserve.server.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    KVCacheExhaustedError,
    ModelLoadError,
    UnsupportedModelError,
)

logger = logging.getLogger("protoserve.server.errors")

# A status message longer than this is cut: it travels in HTTP/2 trailers.
MAX_STATUS_MESSAGE_CHARS = 2000

RETRY_AFTER_METADATA_KEY = "retry-after"


class ModelNotFoundError(LookupError):
    """A request named a model the server does not serve. Maps to NOT_FOUND."""

    def __init__(self, model_id: str, known_ids: list[str]) -> None:
        self.model_id = model_id
        self.known_ids = known_ids
        known = ", ".join(repr(known_id) for known_id in known_ids) or "none"
        super().__init__(f"model {model_id!r} is not served here; known models: {known}")


class NoDefaultModelError(ModelNotFoundError):
    """A request left the model empty but the server has no model of that kind."""

    def __init__(self, kind: str, known_ids: list[str]) -> None:
        super().__init__("", known_ids)
        known = ", ".join(repr(known_id) for known_id in known_ids) or "none"
        self.args = (f"this server has no default {kind} model; known models: {known}",)


class ServerPermissionError(PermissionError):
    """The server is configured not to allow what was asked. Maps to PERMISSION_DENIED with its message."""


class ServerDrainingError(Exception):
    """The server is shutting down (or still starting) and takes no new calls. Maps to UNAVAILABLE."""


@dataclass(frozen=True)
class StatusForException:
    """What a caller receives for one exception."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()
    log_traceback: bool = False


def _caller_message(exc: BaseException) -> str:
    message = str(exc) or type(exc).__name__
    if len(message) > MAX_STATUS_MESSAGE_CHARS:
        message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
    return message


def status_for_exception(exc: BaseException, request_id: str) -> StatusForException:
    """The status, message and trailing metadata that report `exc` to the caller."""
    if isinstance(exc, (InvalidRequestError, UnsupportedModelError, ModelLoadError)):
        return StatusForException(grpc.StatusCode.INVALID_ARGUMENT, _caller_message(exc))
    if isinstance(exc, ModelNotFoundError):
        return StatusForException(grpc.StatusCode.NOT_FOUND, _caller_message(exc))
    if isinstance(exc, EngineOverloadedError):
        retry_after_seconds = max(1, math.ceil(exc.retry_after_s))
        return StatusForException(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _caller_message(exc),
            ((RETRY_AFTER_METADATA_KEY, str(retry_after_seconds)),),
        )
    if isinstance(exc, KVCacheExhaustedError):
        return StatusForException(grpc.StatusCode.RESOURCE_EXHAUSTED, _caller_message(exc))
    if isinstance(exc, (EngineDeadError, ServerDrainingError)):
        return StatusForException(grpc.StatusCode.UNAVAILABLE, _caller_message(exc))
    if isinstance(exc, ServerPermissionError):
        return StatusForException(grpc.StatusCode.PERMISSION_DENIED, _caller_message(exc))
    if isinstance(exc, PermissionError):
        # An operating-system permission error may name server paths: say only what happened.
        return StatusForException(
            grpc.StatusCode.PERMISSION_DENIED, f"permission denied (request id {request_id})", log_traceback=True
        )
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since Python 3.11
        return StatusForException(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"the request ran out of time (request id {request_id})"
        )
    return StatusForException(
        grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})", log_traceback=True
    )


async def abort_for_exception(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, request_id: str
) -> NoReturn:
    """End the call with the status that `exc` maps to. Always raises (grpc's abort exception).

    An exception that is already grpc's own abort, or a cancellation, is re-raised untouched.
    """
    if isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError)):
        raise exc
    status = status_for_exception(exc, request_id)
    if status.log_traceback:
        logger.error("request %s failed: %s", request_id, type(exc).__name__, exc_info=exc)
    else:
        logger.info("request %s rejected: %s %s", request_id, status.code.name, status.message)
    await context.abort(status.code, status.message, status.trailing_metadata)
    raise RuntimeError("grpc's abort returned instead of raising")  # grpc guarantees it raises


@asynccontextmanager
async def rpc_errors(
    context: grpc.aio.ServicerContext[Any, Any], request_id: Callable[[], str] | str
) -> AsyncIterator[None]:
    """Map any exception raised inside the block onto the call's status.

    `request_id` may be a callable, so a block that learns its id late still reports the right one.
    Works inside async generators (streaming methods) as well as coroutines.
    """
    try:
        yield
    except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        await abort_for_exception(context, exc, request_id() if callable(request_id) else request_id)
