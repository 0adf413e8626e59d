"""Image references in requests: http(s) URLs go upstream as they are (the server decides whether to
fetch them); base64 `data:` URLs are decoded here, so size limits apply before anything is sent."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from protoserve.translator.errors import invalid_request
from protoserve.v1.generation_pb2 import Image

_ALLOWED_DETAILS = ("auto", "low", "high")


@dataclass
class ImageBudget:
    """Counts the images of one request against the limits; one instance per request."""

    max_images: int
    max_image_bytes: int
    images_seen: int = 0

    def image(self, url: str, detail: str, param: str) -> Image:
        """The proto Image for an OpenAI image URL, counted against the limits."""
        self.images_seen += 1
        if self.images_seen > self.max_images:
            raise invalid_request(f"too many images: at most {self.max_images} per request", param=param)
        if detail and detail not in _ALLOWED_DETAILS:
            raise invalid_request(f"image detail must be one of auto, low, high, not {detail!r}", param=param)
        lowered = url[:16].lower()
        if lowered.startswith("data:"):
            return self._data_url_image(url, detail, param)
        if lowered.startswith(("http://", "https://")):
            return Image(url=url, detail=detail)
        raise invalid_request("image URLs must be http(s) or base64 data: URLs", param=param)

    def _data_url_image(self, url: str, detail: str, param: str) -> Image:
        header, comma, payload = url.partition(",")
        if not comma:
            raise invalid_request("malformed data URL: no ',' before the data", param=param)
        media_type, *attributes = header[len("data:") :].split(";")
        if not media_type.lower().startswith("image/"):
            raise invalid_request(f"data URL media type must be image/*, not {media_type!r}", param=param)
        if "base64" not in (attribute.lower() for attribute in attributes):
            return Image(url=url, detail=detail)
        encoded = "".join(payload.split())
        if len(encoded) // 4 * 3 > self.max_image_bytes:
            raise invalid_request(
                f"image is larger than the limit of {self.max_image_bytes} bytes",
                param=param,
                code="image_too_large",
            )
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise invalid_request("data URL is not valid base64", param=param) from None
        if not data:
            raise invalid_request("data URL holds no image bytes", param=param)
        return Image(data=data, detail=detail)
