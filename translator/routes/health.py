"""GET /health (200 only while the upstream reports SERVING), GET /metrics, GET /openapi.json."""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from protoserve.translator.openapi import OPENAPI_DOCUMENT
from protoserve.translator.state import METRICS_KEY, config_of, upstream_of


async def health(request: web.Request) -> web.Response:
    upstream = upstream_of(request)
    try:
        reply = await upstream.health.Check(
            HealthCheckRequest(service=""), timeout=config_of(request).health_timeout_seconds
        )
    except grpc.aio.AioRpcError as error:
        return web.json_response({"status": "unavailable", "upstream": error.code().name}, status=503)
    status_name = HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != HealthCheckResponse.SERVING:
        return web.json_response({"status": "not_serving", "upstream": status_name}, status=503)
    return web.json_response({"status": "ok", "upstream": status_name})


async def metrics(request: web.Request) -> web.Response:
    exposition = request.app[METRICS_KEY].exposition()
    return web.Response(body=exposition, headers={"Content-Type": request.app[METRICS_KEY].content_type})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI_DOCUMENT)
