"""API keys: `Authorization: Bearer KEY` on every request except an exact allow-list of raw paths.

The check reads the raw request target as the client sent it, before any normalisation, so
`//v1/models`, `/v1/../v1/models`, `/V1/models`, `/v1/models/` or percent-encoded forms cannot slip
past it: anything not exactly an open path needs a key, whether a route matches it or not. Keys are
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.errors import ApiError


def _bearer_token(header: str | None) -> bytes | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", errors="surrogateescape")


def is_authorized(header: str | None, keys: list[bytes]) -> bool:
    """Whether the Authorization header carries one of `keys`; compares against every key, in
    constant time for each, so the time taken tells nothing about which key nearly matched."""
    token = _bearer_token(header)
    if token is None:
        return False
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched


def make_auth_middleware(config: TranslatorConfig) -> Middleware:
    """A middleware that answers 401 without a valid key; lets everything through when no keys are set."""
    keys = [key.encode("utf-8") for key in config.api_keys]

    @web.middleware
    async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys:
            raw_path = request.raw_path.split("?", 1)[0]
            if raw_path not in config.open_paths and not is_authorized(request.headers.get("Authorization"), keys):
                raise ApiError(
                    401,
                    "missing or invalid API key: send it as 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return require_api_key
