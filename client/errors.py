"""Errors the client raises: one `ProtoserveError` subclass per gRPC status code.

Every error carries the status `code` and the server's `message`. `InvalidArgument` is also a
`ValueError`, so a bad argument caught before sending (an unknown sampling option, a malformed
message) and one the server refuses are caught the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class ProtoserveError(Exception):
    """A call failed. `code` is the gRPC status, `message` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(ProtoserveError, ValueError):
    """The request is malformed or out of range (HTTP 400)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ProtoserveError):
    """The model (or another named thing) does not exist (HTTP 404)."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ProtoserveError):
    """No API key, or a wrong one (HTTP 401)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ProtoserveError):
    """The server does not allow this call, e.g. loading models when on-demand loading is off (HTTP 403)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Overloaded(ProtoserveError):
    """The server's queue is full (RESOURCE_EXHAUSTED, HTTP 429).

    `retry_after` is the server's hint in seconds (from the `retry-after` trailing metadata), or None.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Unavailable(ProtoserveError):
    """The server cannot be reached, is not ready, or is shutting down (HTTP 503)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ProtoserveError):
    """The call's deadline (the client's `timeout`) passed before it finished (HTTP 504)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ProtoserveError):
    """The call was cancelled (HTTP 499)."""

    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(ProtoserveError):
    """The server is not in a state to run this call, e.g. the model cannot do what was asked."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(ProtoserveError):
    """The server does not offer this method (an older server, or a service that is off)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(ProtoserveError):
    """The server failed (HTTP 500)."""

    code = grpc.StatusCode.INTERNAL


_ERROR_BY_CODE: dict[grpc.StatusCode, type[ProtoserveError]] = {
    error_type.code: error_type
    for error_type in (
        InvalidArgument,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        Overloaded,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        FailedPrecondition,
        Unimplemented,
        InternalError,
    )
}
_ERROR_BY_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidArgument


def parse_retry_after(metadata: Sequence[tuple[str, str | bytes]] | None) -> float | None:
    """Seconds from a `retry-after` metadata entry, or None when absent or not a non-negative number."""
    for key, value in metadata or ():
        if key.lower() != "retry-after":
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        try:
            seconds = float(text.strip())
        except ValueError:
            return None
        return seconds if seconds >= 0 and seconds != float("inf") else None
    return None


def error_from_status(
    code: grpc.StatusCode, message: str, trailing_metadata: Sequence[tuple[str, str | bytes]] | None = None
) -> ProtoserveError:
    """The `ProtoserveError` subclass for a status code (the base class for codes without one)."""
    error_type = _ERROR_BY_CODE.get(code, ProtoserveError)
    if error_type is Overloaded:
        return Overloaded(message, code=code, retry_after=parse_retry_after(trailing_metadata))
    return error_type(message, code=code)


def error_from_rpc(error: grpc.RpcError) -> ProtoserveError:
    """Convert a grpc (sync or asyncio) call error into a `ProtoserveError`."""
    code_method = getattr(error, "code", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    details_method = getattr(error, "details", None)
    message = (details_method() if callable(details_method) else None) or str(error)
    metadata_method = getattr(error, "trailing_metadata", None)
    metadata = metadata_method() if callable(metadata_method) else None
    return error_from_status(code or grpc.StatusCode.UNKNOWN, message, metadata)
