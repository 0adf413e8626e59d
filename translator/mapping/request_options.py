"""The non-sampling options of a request: request id, priority, end-user id."""

from __future__ import annotations

from protoserve.translator.mapping.fields import INT32_MAX, INT32_MIN, Fields
from protoserve.v1.common_pb2 import RequestOptions


def request_options(fields: Fields, request_id: str) -> RequestOptions:
    """RequestOptions from `priority` and `user` in the body and the request id of the HTTP request."""
    return RequestOptions(
        request_id=request_id,
        priority=fields.optional_int("priority", INT32_MIN, INT32_MAX) or 0,
        user=fields.optional_string("user") or "",
    )
