"""Images of a conversation: loaded under the server's image policy, then rendered with the processor.

The model's processor renders the chat template, expands each image placeholder into the model's
image tokens and computes pixel tensors. The engine receives the expanded prompt ids and
`MultimodalInputs` holding every processor output besides the ids, plus each image's content hash
(so the prefix cache never matches one image's KV blocks for another image).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protoserve.server.chat.template import render_with_processor
from protoserve.server.engine.api import MultimodalInputs
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.limits import RequestLimits

TEXT_ONLY_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


@dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt with images, as the engine takes it."""

    token_ids: list[int]
    multimodal: MultimodalInputs


async def load_images(sources: Sequence[bytes | str], policy: Any, limits: RequestLimits) -> list[Any]:
    """Every image of the request (`LoadedImage`s), loaded concurrently; any refusal fails the request."""
    from protoserve.server.media.images import load_image

    for position, source in enumerate(sources):
        if isinstance(source, (bytes, bytearray)) and len(source) > limits.max_image_bytes:
            raise InvalidRequestError(
                f"image {position} is {len(source)} bytes; at most {limits.max_image_bytes} allowed"
            )
    return list(await asyncio.gather(*(load_image(source, policy) for source in sources)))


def with_images(messages: list[dict[str, Any]], images: Sequence[Any]) -> list[dict[str, Any]]:
    """A copy of the messages whose `{"type": "image"}` parts hold their decoded images, in order."""
    remaining = iter(images)
    filled = copy.deepcopy(messages)
    for message in filled:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image":
                    part["image"] = next(remaining).image
    return filled


async def processed_prompt(
    processor: Any,
    template: str,
    messages: list[dict[str, Any]],
    images: Sequence[Any],
    *,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
    limits: RequestLimits,
) -> ProcessedPrompt:
    """The prompt ids and multimodal inputs of a conversation with images (work runs in a thread)."""
    if processor is None:
        raise InvalidRequestError("this model has no image processor; send text only")
    outputs = await render_with_processor(
        processor, template, with_images(messages, images), tools=tools, template_kwargs=template_kwargs, limits=limits
    )
    token_ids = [int(token_id) for token_id in outputs["input_ids"][0].tolist()]
    tensors = {name: value for name, value in outputs.items() if name not in TEXT_ONLY_KEYS}
    hashes = tuple(image.content_hash for image in images)
    return ProcessedPrompt(token_ids, MultimodalInputs(tensors=tensors, content_hashes=hashes))
