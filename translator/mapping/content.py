"""Message content (a string or a list of parts) -> proto ContentParts.

Accepts the chat parts (`text`, `image_url`, `refusal`) and the Responses API parts (`input_text`,
`output_text`, `input_image`), so both routes share one reader.
"""

from __future__ import annotations

from typing import Any

from protoserve.translator.errors import invalid_request
from protoserve.translator.mapping.fields import Fields, as_list, as_string
from protoserve.translator.mapping.images import ImageBudget
from protoserve.v1.generation_pb2 import ContentPart

_TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


def _image_part(part: Fields, images: ImageBudget) -> ContentPart:
    kind = part.string("type")
    reference = part.required("image_url")
    param = part.param("image_url")
    detail = part.optional_string("detail") or ""
    if isinstance(reference, dict):  # chat: {"image_url": {"url", "detail"}}
        reference_fields = Fields(reference, param)
        url = reference_fields.string("url")
        param = reference_fields.param("url")
        detail = reference_fields.optional_string("detail") or detail
    elif isinstance(reference, str) and kind == "input_image":  # responses: {"image_url": "..."}
        url = reference
    else:
        url = as_string(reference, param)  # plain string in chat: lenient, as many clients send it
    return ContentPart(image=images.image(url, detail, param))


def content_part(value: Any, param: str, images: ImageBudget) -> ContentPart:
    """One content part object."""
    part = Fields(value, param)
    kind = part.string("type")
    if kind in _TEXT_PART_KEYS:
        return ContentPart(text=part.string(_TEXT_PART_KEYS[kind]))
    if kind in ("image_url", "input_image"):
        return _image_part(part, images)
    raise invalid_request(
        f"'{part.param('type')}': content parts of type {kind!r} are not supported "
        "(use text, image_url, input_text or input_image)",
        param=part.param("type"),
    )


def content_parts(value: Any, param: str, images: ImageBudget) -> list[ContentPart]:
    """A message's content: None (no parts), a string (one text part) or a list of parts."""
    if value is None:
        return []
    if isinstance(value, str):
        return [ContentPart(text=value)]
    return [content_part(item, f"{param}[{index}]", images) for index, item in enumerate(as_list(value, param))]
