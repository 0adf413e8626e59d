"""The translator application: routes, middlewares, and the upstream channel's lifetime.

`make_app(config)` builds the app; the gRPC channel is opened when the app starts (inside its event
loop) and closed when it stops. Run it with `handler_cancellation=True` (see `server.py`) so that a
client that disconnects cancels its handler, and with it the upstream call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from protoserve.translator.auth import make_auth_middleware
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.cors import add_cors_headers, make_cors_middleware
from protoserve.translator.metrics import TranslatorMetrics
from protoserve.translator.middlewares import assign_request_ids, convert_errors, record_metrics
from protoserve.translator.routes.audio import transcriptions, translations
from protoserve.translator.routes.chat import chat_completions
from protoserve.translator.routes.completions import completions
from protoserve.translator.routes.health import health, metrics, openapi
from protoserve.translator.routes.models import get_model, list_models
from protoserve.translator.routes.responses import responses
from protoserve.translator.state import CONFIG_KEY, METRICS_KEY, REQUEST_ID_HEADER, UPSTREAM_KEY, request_id_of
from protoserve.translator.upstream import Upstream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# (method, path, handler): the whole HTTP surface; openapi.py documents exactly these.
ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/responses", responses),
    ("POST", "/v1/audio/transcriptions", transcriptions),
    ("POST", "/v1/audio/translations", translations),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{model_id:.+}", get_model),
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("GET", "/openapi.json", openapi),
]


def make_app(config: TranslatorConfig) -> web.Application:
    """A translator app for `config`; nothing connects until the app starts."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            record_metrics,
            convert_errors,
            assign_request_ids,
            make_cors_middleware(config),
            make_auth_middleware(config),
        ],
    )
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = TranslatorMetrics()

    async def upstream_lifetime(app: web.Application) -> AsyncIterator[None]:
        upstream = Upstream.open(config, app[METRICS_KEY])
        app[UPSTREAM_KEY] = upstream
        yield
        await upstream.close()

    async def add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
        request_id = request_id_of(request)
        if request_id is not None:
            response.headers[REQUEST_ID_HEADER] = request_id
        add_cors_headers(config, request, response)

    app.cleanup_ctx.append(upstream_lifetime)
    app.on_response_prepare.append(add_common_headers)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app
