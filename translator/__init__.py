"""protoserve translator: an aiohttp OpenAI-compatible REST layer over the gRPC API. Never imports torch.

Modules, one concept each:
- `app`: `make_app(config)`, the route table (`ROUTES`), middlewares, the channel's lifetime.
- `server`: `start_translator(config, host, port)` -> a running translator (CLI and tests).
- `cli`: `add_translate_arguments(parser)`, `run_translate(args)` for `protoserve translate`.
- `config`: the frozen `TranslatorConfig`.
- `upstream`: channel, stubs, metadata; gRPC errors -> ApiError; cancels calls on disconnect.
- `errors`: `ApiError`, the OpenAI error body, the gRPC status -> HTTP mapping.
- `body`, `multipart_form`: reading JSON and multipart bodies within size limits.
- `sse`: server-sent events out. `auth`: API keys on raw paths. `cors`: CORS when configured.
- `middlewares`: metrics, error conversion, request ids. `metrics`: Prometheus counters.
- `state`: typed app/request state (AppKey, RequestKey), request id and deadline headers.
- `openapi`: the OpenAPI 3.1 document of the routes.
- `mapping/`: pure OpenAI JSON <-> proto conversions, one file per resource.
- `routes/`: the aiohttp handlers, one file per resource; `routes/streaming.py` relays gRPC streams as SSE.
"""
