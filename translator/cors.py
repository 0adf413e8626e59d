"""CORS, off unless origins are configured. With origins: preflights from those origins are answered
(204), preflights from others are refused (403), and responses to listed origins carry
Access-Control-Allow-Origin. Headers are added when a response is prepared, so SSE streams and
error answers get them too."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.errors import ApiError

_ALLOWED_METHODS = "GET, POST, OPTIONS"
_DEFAULT_ALLOWED_HEADERS = "Authorization, Content-Type, X-Request-Id, X-Request-Timeout"
_EXPOSED_HEADERS = "X-Request-Id, Retry-After"
_PREFLIGHT_MAX_AGE_SECONDS = "600"


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def make_cors_middleware(config: TranslatorConfig) -> Middleware:
    """Answers preflights (before the API-key check: browsers send none on a preflight)."""
    allowed = frozenset(config.cors_origins)

    @web.middleware
    async def answer_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not allowed or not is_preflight(request):
            return await handler(request)
        origin = request.headers.get("Origin", "")
        if origin not in allowed:
            raise ApiError(403, "this origin is not allowed by the translator's CORS settings", code="cors_origin")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": _ALLOWED_METHODS,
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", _DEFAULT_ALLOWED_HEADERS
                ),
                "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE_SECONDS,
            },
        )

    return answer_preflight


def add_cors_headers(config: TranslatorConfig, request: web.Request, response: web.StreamResponse) -> None:
    """Mark a response readable by the request's origin, when that origin is configured."""
    origin = request.headers.get("Origin")
    if origin is None or origin not in config.cors_origins:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = _EXPOSED_HEADERS
    response.headers.add("Vary", "Origin")
