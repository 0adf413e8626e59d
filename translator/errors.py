"""OpenAI-shaped errors: one exception type, its JSON body, and the gRPC status -> HTTP mapping.

Every error the translator answers has the body `{"error": {"message", "type", "param", "code"}}`.
Upstream messages are passed on for the statuses the server sets about the request itself (bad
argument, unknown model, overload...); for server-side failures the client gets a fixed sentence,
so addresses and internals of the upstream never leak.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import grpc

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; OpenAI has none

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    CLIENT_CLOSED_REQUEST: "client_closed_request",
    503: "service_unavailable_error",
    504: "timeout_error",
}

_HTTP_STATUS_BY_GRPC_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: CLIENT_CLOSED_REQUEST,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# Statuses whose upstream message is about the request and safe to show; the rest get a fixed text.
_UPSTREAM_MESSAGE_SHOWN = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

_FIXED_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "the model server is unavailable; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the request did not finish before its deadline",
    grpc.StatusCode.CANCELLED: "the request was cancelled",
}

DEFAULT_RETRY_AFTER_SECONDS = 1

# The server names the proto field first in its INVALID_ARGUMENT messages ("sampling.temperature must
# be ...", "messages[2].content ..."); that field, in OpenAI's naming, becomes the error's `param`.
_SAMPLING_FIELD_AT_START = re.compile(r"^sampling\.([a-z_]+)\b")
_MESSAGE_FIELD_AT_START = re.compile(r"^(messages\[\d+\](?:\.[a-z_]+)?)(?=[\s:,]|$)")


def error_type_for_status(status: int) -> str:
    """OpenAI's `error.type` for an HTTP status."""
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


@dataclass
class ApiError(Exception):
    """An error answered to the client as an OpenAI error body with `status`.

    `param` names the offending request field (dotted path, e.g. `messages[0].content`), when known.
    `headers` are added to the HTTP response (Retry-After, Allow).
    """

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": error_type_for_status(self.status),
                "param": self.param,
                "code": self.code,
            }
        }


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 about the request body."""
    return ApiError(400, message, param=param, code=code)


def _retry_after_seconds(trailing_metadata: Any) -> int:
    for key, value in trailing_metadata or ():
        if key.lower() == "retry-after":
            try:
                return max(0, int(float(value)))
            except (TypeError, ValueError):
                return DEFAULT_RETRY_AFTER_SECONDS
    return DEFAULT_RETRY_AFTER_SECONDS


def _param_named_in(details: str) -> str | None:
    for pattern in (_SAMPLING_FIELD_AT_START, _MESSAGE_FIELD_AT_START):
        match = pattern.match(details)
        if match:
            return match.group(1)
    return None


def api_error_from_grpc(code: grpc.StatusCode, details: str | None, trailing_metadata: Any = None) -> ApiError:
    """Map a gRPC status (code, details, trailing metadata) to the ApiError answered to the client."""
    status = _HTTP_STATUS_BY_GRPC_CODE.get(code, 500)
    if code in _UPSTREAM_MESSAGE_SHOWN and details:
        message = details
    else:
        message = _FIXED_MESSAGES.get(code, "the model server failed to answer this request")
        if status == CLIENT_CLOSED_REQUEST:
            logger.info("upstream call cancelled: %s", details)
        else:
            logger.warning("upstream error %s: %s", code.name, details)
    headers: dict[str, str] = {}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = str(_retry_after_seconds(trailing_metadata))
    param = _param_named_in(details) if code == grpc.StatusCode.INVALID_ARGUMENT and details else None
    return ApiError(status, message, param=param, code=code.name.lower(), headers=headers)


def api_error_from_rpc_error(error: grpc.aio.AioRpcError) -> ApiError:
    """Map a failed grpc.aio call to an ApiError."""
    return api_error_from_grpc(error.code(), error.details(), error.trailing_metadata())
