"""Typed application state (web.AppKey) and per-request values the middlewares set."""

from __future__ import annotations

import math
import re
import uuid

from aiohttp import web
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.errors import invalid_request
from protoserve.translator.metrics import TranslatorMetrics
from protoserve.translator.upstream import CallOptions, Upstream

CONFIG_KEY = web.AppKey("config", TranslatorConfig)
METRICS_KEY = web.AppKey("metrics", TranslatorMetrics)
UPSTREAM_KEY = web.AppKey("upstream", Upstream)

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def assign_request_id(request: web.Request) -> str:
    """Take the client's X-Request-Id (1-128 of letters, digits and ._:@/+=-), or make one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is None:
        request_id = uuid.uuid4().hex
    elif _VALID_REQUEST_ID.fullmatch(given):
        request_id = given
    else:
        raise invalid_request(
            f"{REQUEST_ID_HEADER} must be 1 to 128 letters, digits or ._:@/+=- characters", param=REQUEST_ID_HEADER
        )
    request[REQUEST_ID_KEY] = request_id
    return request_id


def request_id_of(request: web.Request) -> str | None:
    """The request id the middleware assigned, if it got that far."""
    return request.get(REQUEST_ID_KEY)


def request_timeout(request: web.Request) -> float | None:
    """The gRPC deadline asked for with X-Request-Timeout (seconds, > 0), or None."""
    raw = request.headers.get(REQUEST_TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= 86_400):
        raise invalid_request(
            f"{REQUEST_TIMEOUT_HEADER} must be a number of seconds between 0 and 86400", param=REQUEST_TIMEOUT_HEADER
        )
    return seconds


def call_options(request: web.Request) -> CallOptions:
    """Metadata and deadline for the upstream calls of this request."""
    request_id = request_id_of(request) or assign_request_id(request)
    return request.app[UPSTREAM_KEY].call_options(request_id, request_timeout(request))


def upstream_of(request: web.Request) -> Upstream:
    return request.app[UPSTREAM_KEY]


def config_of(request: web.Request) -> TranslatorConfig:
    return request.app[CONFIG_KEY]
