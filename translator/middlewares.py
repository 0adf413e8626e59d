"""The middlewares every route goes through, outermost first: metrics, errors, request id.

`errors` is the one place exceptions become HTTP answers: ApiError as its OpenAI body, aiohttp's
HTTP errors (404, 405, 413) in the same shape, anything else as a 500 whose text reveals nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler
from protoserve.translator.errors import CLIENT_CLOSED_REQUEST, ApiError
from protoserve.translator.metrics import UNMATCHED_ROUTE
from protoserve.translator.state import METRICS_KEY, assign_request_id

logger = logging.getLogger(__name__)


def error_response(error: ApiError) -> web.Response:
    """The JSON response of an ApiError, with its extra headers."""
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def _route_label(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


@web.middleware
async def record_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        request.app[METRICS_KEY].observe_request(
            _route_label(request), request.method, status, time.perf_counter() - started
        )


def _from_http_exception(request: web.Request, error: web.HTTPException) -> ApiError:
    if error.status == 404:
        return ApiError(404, f"no such route: {request.method} {request.path}", code="unknown_route")
    if error.status == 405:
        allowed = error.headers.get("Allow", "")
        return ApiError(
            405,
            f"method {request.method} is not allowed here (allowed: {allowed})",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    if error.status == 413:
        return ApiError(413, "request body is larger than the limit", code="request_too_large")
    return ApiError(error.status, error.reason or "request failed")


@web.middleware
async def convert_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        if error.status >= 500:
            logger.warning("%s %s answered %d: %s", request.method, request.path, error.status, error.message)
        return error_response(error)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(_from_http_exception(request, error))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        logger.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(ApiError(500, "the translator failed to answer this request"))


@web.middleware
async def assign_request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    assign_request_id(request)
    return await handler(request)
