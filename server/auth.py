"""API-key authentication of gRPC calls.

When keys are configured, every call except health checks and reflection must carry the metadata
`authorization: Bearer KEY`. The presented key is compared with every configured key in constant
time (`hmac.compare_digest`, no early exit), so timing says nothing about which key or how much of
it matched. Keys are never logged, and rejections never echo what was sent.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import grpc
import grpc.aio
from protoserve.client.api_keys import api_keys_in
from protoserve.server.interceptors import is_infrastructure_method, rejecting_handler

logger = logging.getLogger("protoserve.server.auth")

AUTHORIZATION_METADATA_KEY = "authorization"
BEARER_PREFIX = "bearer "


def read_api_key_file(path: Path) -> list[str]:
    """Keys from a file, one a line; blank lines and lines starting with '#' are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {str(path)!r}: {exc.strerror}") from None
    return api_keys_in(text)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the `authorization: Bearer TOKEN` metadata entry, or None when absent or malformed."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION_METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if value[: len(BEARER_PREFIX)].lower() != BEARER_PREFIX:
            return None
        token = value[len(BEARER_PREFIX) :].strip()
        return token or None
    return None


class ApiKeyChecker:
    """Holds the configured keys and answers whether a presented key is one of them."""

    def __init__(self, keys: Sequence[str]) -> None:
        cleaned = [key.strip() for key in keys]
        if any(not key for key in cleaned):
            raise ValueError("an API key is empty")
        self._keys = tuple(key.encode("utf-8") for key in cleaned)

    def __repr__(self) -> str:
        return f"ApiKeyChecker({len(self._keys)} keys)"

    def accepts(self, presented: str) -> bool:
        presented_bytes = presented.encode("utf-8")
        matched = False
        for key in self._keys:
            # `|` and not `or`: compare against every key whatever the outcome of earlier ones.
            matched = hmac.compare_digest(presented_bytes, key) | matched
        return matched


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid API key with UNAUTHENTICATED; health and reflection stay open."""

    def __init__(self, checker: ApiKeyChecker) -> None:
        self._checker = checker

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if is_infrastructure_method(method):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            message = "missing API key: send the metadata 'authorization: Bearer <key>'"
        elif not self._checker.accepts(token):
            message = "invalid API key"
        else:
            return await continuation(handler_call_details)
        logger.info("rejected a call to %s: %s", method, message.split(":")[0])
        handler = await continuation(handler_call_details)
        return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)  # type: ignore[return-value]
