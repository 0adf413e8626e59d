"""Multimodal prefill: run the vision tower once and merge image features into the prompt embeddings.

For LLaVA-family models (and others whose `get_image_features` returns one feature vector per
image placeholder token, as Idefics3/SmolVLM do), the merged prompt embeddings are computed once,
kept on the sequence until its prefill is done, and fed to the language model as `inputs_embeds`
through the same paged attention as text (chunked prefill included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from protoserve.server.engine.api import MultimodalInputs
from protoserve.server.engine.errors import InvalidRequestError, UnsupportedModelError
from transformers import PreTrainedModel


def image_token_id_of(model: PreTrainedModel) -> int | None:
    """The placeholder token id of images in the prompt, or None for a text-only model."""
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def supports_images(model: PreTrainedModel) -> bool:
    return image_token_id_of(model) is not None and callable(getattr(model, "get_image_features", None))


def _flatten_features(features: object, hidden_size: int) -> torch.Tensor:
    """`get_image_features` returns a tensor, a list of per-image tensors, or an output object
    holding them in `pooler_output`; all become [num_placeholder_tokens, hidden]."""
    pooled = getattr(features, "pooler_output", None)
    if pooled is not None:
        features = pooled
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    if isinstance(features, (list, tuple)):
        features = torch.cat([part.reshape(-1, hidden_size) for part in features], dim=0)
    if not isinstance(features, torch.Tensor):
        raise UnsupportedModelError(f"get_image_features returned {type(features).__name__}, not tensors")
    return features.reshape(-1, hidden_size)


@torch.inference_mode()
def compute_prompt_embeddings(
    model: PreTrainedModel,
    prompt_token_ids: Sequence[int],
    multimodal: MultimodalInputs,
    image_token_id: int | None,
) -> torch.Tensor:
    """The prompt's input embeddings [prompt_tokens, hidden] with image features scattered into
    the image placeholder positions. Raises InvalidRequestError when the number of placeholders
    does not match the features."""
    get_image_features = getattr(model, "get_image_features", None)
    if image_token_id is None or not callable(get_image_features):
        raise InvalidRequestError(f"{type(model).__name__} does not accept images")
    embedding_layer = model.get_input_embeddings()
    device = next(model.parameters()).device
    input_ids = torch.tensor(list(prompt_token_ids), dtype=torch.long, device=device)
    embeddings = embedding_layer(input_ids[None])[0].clone()
    placeholder = input_ids == image_token_id
    tensors = {
        name: value.to(device) if isinstance(value, torch.Tensor) else value
        for name, value in multimodal.tensors.items()
    }
    pixel_values = tensors.get("pixel_values")
    if isinstance(pixel_values, torch.Tensor) and pixel_values.is_floating_point():
        tensors["pixel_values"] = pixel_values.to(embeddings.dtype)
    try:
        raw_features = get_image_features(**tensors)
    except (TypeError, ValueError, RuntimeError) as error:  # missing or malformed image tensors
        raise InvalidRequestError(f"the images could not be encoded: {type(error).__name__}: {error}") from error
    features = _flatten_features(raw_features, embeddings.shape[-1])
    num_placeholders = int(placeholder.sum())
    if num_placeholders != features.shape[0]:
        raise InvalidRequestError(
            f"the prompt has {num_placeholders} image placeholder tokens but the images give "
            f"{features.shape[0]} feature vectors"
        )
    embeddings[placeholder] = features.to(embeddings.dtype)
    return embeddings
