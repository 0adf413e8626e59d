"""Reading request bodies within the size limit: the limit is enforced while reading, never after.

A declared Content-Length over the limit is refused before a byte is read; a chunked body is
counted as it arrives and refused as soon as it passes the limit.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from aiohttp import web
from protoserve.translator.errors import ApiError, invalid_request

_READ_CHUNK_BYTES = 64 * 1024
_JSON_TYPES = ("application/json",)
# A \uD800-\uDFFF escape: JSON may spell half of a surrogate pair this way, which no UTF-8 can carry.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


def too_large(limit: int, what: str = "request body") -> ApiError:
    """The 413 for a body or upload over `limit` bytes."""
    return ApiError(413, f"{what} is larger than the limit of {limit} bytes", code="request_too_large")


def check_declared_length(request: web.Request, limit: int) -> None:
    """413 at once when the declared Content-Length is over `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(literal: str) -> float:
    """A JSON number as a float, refusing one too large for a float (1e999 would become infinity,
    which no JSON can carry back out)."""
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"the number {literal[:40]} is out of range")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A body's bytes as a JSON object; 400 for invalid UTF-8 (lone surrogate escapes included),
    invalid JSON, NaN/Infinity or a number beyond a float's range, or a value that is not an object
    (string, array, number, null)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("the request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise invalid_request("the request body's JSON is nested too deeply") from None
    except ValueError as error:
        raise invalid_request(f"the request body is not valid JSON: {error}") from None
    if _SURROGATE_ESCAPE.search(text) is not None:
        _reject_lone_surrogates(value)
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__.replace("dict", "object").replace("list", "array")
        raise invalid_request(f"the request body must be a JSON object, not {kind}")
    return value


def _reject_lone_surrogates(value: Any) -> None:
    """400 when an escaped surrogate was not half of a pair (a paired one decodes to one character)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_request(
            "the request body holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF), which is not valid text"
        ) from None


def undecodable_body(error: web.RequestPayloadError) -> ApiError:
    """The 400 for a body that cannot be read as sent: one whose Content-Encoding (gzip, deflate)
    does not decompress, or whose chunked framing breaks off. The rest of such a body cannot be
    skipped to find the next request, so the answer closes the connection (aiohttp then logs it)."""
    cause = error.__cause__ or error
    detail = " ".join(str(getattr(cause, "message", None) or cause).split())
    answer = invalid_request(f"the request body could not be read: {detail}")
    answer.headers["Connection"] = "close"
    return answer


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing with 413 once more than `limit` bytes arrive (counted after any
    Content-Encoding is undone) and with 400 when it cannot be decoded."""
    check_declared_length(request, limit)
    received = bytearray()
    try:
        async for chunk in request.content.iter_chunked(_READ_CHUNK_BYTES):
            received += chunk
            if len(received) > limit:
                raise too_large(limit)
    except web.RequestPayloadError as error:
        raise undecodable_body(error) from None
    return bytes(received)


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 415 unless it is sent as application/json (a missing Content-Type
    is taken as JSON), 413 over `limit`, 400 when it is not a JSON object."""
    if "Content-Type" in request.headers and request.content_type not in _JSON_TYPES:
        if not request.content_type.endswith("+json"):
            raise ApiError(
                415,
                f"the request body must be sent as application/json, not {request.content_type}",
                code="unsupported_media_type",
            )
    return parse_json_object(await read_limited(request, limit))
