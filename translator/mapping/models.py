"""ModelInfo -> OpenAI `model` objects (with protoserve's extra facts alongside)."""

from __future__ import annotations

from typing import Any

from protoserve.v1.models_pb2 import ListModelsResponse, Modality, ModelInfo


def model_json(info: ModelInfo) -> dict[str, Any]:
    """One OpenAI `model` object: id, object, created, owned_by, plus context length and abilities."""
    return {
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": info.owned_by or "protoserve",
        "context_length": info.context_length,
        "modalities": [Modality.Name(modality).removeprefix("MODALITY_").lower() for modality in info.modalities],
        "capabilities": list(info.capabilities),
        "loaded": info.loaded,
        "quantization": info.quantization,
    }


def model_list_json(response: ListModelsResponse) -> dict[str, Any]:
    """The `{"object": "list", "data": [...]}` of GET /v1/models."""
    return {"object": "list", "data": [model_json(info) for info in response.models]}
