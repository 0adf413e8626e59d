"""GET /v1/models and GET /v1/models/{id} (ids may contain '/'), answered from the server's list."""

from __future__ import annotations

from aiohttp import web
from protoserve.translator.mapping.models import model_json, model_list_json
from protoserve.translator.state import call_options, upstream_of
from protoserve.v1.models_pb2 import GetModelRequest, ListModelsRequest


async def list_models(request: web.Request) -> web.Response:
    upstream = upstream_of(request)
    options = call_options(request)
    call = upstream.models.ListModels(ListModelsRequest(), metadata=options.metadata, timeout=options.timeout)
    return web.json_response(model_list_json(await upstream.unary(call)))


async def get_model(request: web.Request) -> web.Response:
    upstream = upstream_of(request)
    options = call_options(request)
    model_id = request.match_info["model_id"]
    call = upstream.models.GetModel(GetModelRequest(id=model_id), metadata=options.metadata, timeout=options.timeout)
    return web.json_response(model_json(await upstream.unary(call)))
