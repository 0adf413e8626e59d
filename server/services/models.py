"""ModelService: list and describe the served models; load and unload them when allowed."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc.aio
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.errors import rpc_errors
from protoserve.server.metrics import ServerMetrics
from protoserve.server.registry import ModelDescription, ModelRegistry
from protoserve.server.request_log import current_request_id
from protoserve.v1 import models_pb2, models_pb2_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_MODALITIES = {
    "text": models_pb2.MODALITY_TEXT,
    "image": models_pb2.MODALITY_IMAGE,
    "audio": models_pb2.MODALITY_AUDIO,
}

MAX_MODEL_ID_CHARS = 1024


def model_info(description: ModelDescription) -> models_pb2.ModelInfo:
    """The proto form of a model description."""
    return models_pb2.ModelInfo(
        id=description.id,
        owned_by=description.owned_by,
        created=description.created,
        modalities=[_MODALITIES.get(name, models_pb2.MODALITY_UNSPECIFIED) for name in description.modalities],
        context_length=max(description.context_length, 0),
        quantization=description.quantization,
        loaded=description.loaded,
        architecture=description.architecture,
        dtype=description.dtype,
        device=description.device,
        capabilities=list(description.capabilities),
    )


def _checked_id(model_id: str) -> str:
    if not model_id.strip():
        raise InvalidRequestError("id is empty: give a model id (ListModels shows them)")
    if len(model_id) > MAX_MODEL_ID_CHARS:
        raise InvalidRequestError(f"id is {len(model_id)} characters long; at most {MAX_MODEL_ID_CHARS}")
    return model_id


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """Answers from the registry; every error goes through `rpc_errors`."""

    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics | None = None) -> None:
        self._registry = registry
        self._metrics = metrics or ServerMetrics()

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        async with rpc_errors(context, current_request_id()), self._metrics.observe("", "ListModels", context):
            return models_pb2.ListModelsResponse(models=[model_info(d) for d in self._registry.list()])

    async def GetModel(self, request: models_pb2.GetModelRequest, context: Context) -> models_pb2.ModelInfo:
        label = self._registry.metrics_label(request.id)
        async with rpc_errors(context, current_request_id()), self._metrics.observe(label, "GetModel", context):
            return model_info(self._registry.describe(_checked_id(request.id)))

    async def LoadModel(self, request: models_pb2.LoadModelRequest, context: Context) -> models_pb2.ModelInfo:
        async with rpc_errors(context, current_request_id()), self._metrics.observe("", "LoadModel", context):
            self._registry.check_on_demand_allowed("loading")
            return model_info(await self._registry.load(_checked_id(request.id)))

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: Context
    ) -> models_pb2.UnloadModelResponse:
        label = self._registry.metrics_label(request.id)
        async with rpc_errors(context, current_request_id()), self._metrics.observe(label, "UnloadModel", context):
            self._registry.check_on_demand_allowed("unloading")
            return models_pb2.UnloadModelResponse(unloaded=await self._registry.unload(_checked_id(request.id)))
