"""Turn an image source from a request (raw bytes, a data URL, or an http(s) URL) into an RGB image.

Every refusal is an `ImageRejectedError` (an `InvalidRequestError`) whose message says what to send
instead. Decoding is limited to common raster formats (no plugin that shells out, such as EPS), and
the pixel count is checked from the header before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError
from protoserve.server.media.errors import ImageRejectedError
from protoserve.server.media.safe_fetch import fetch_image_bytes

MEBIBYTE = 1024 * 1024
DECODABLE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


@dataclass(frozen=True)
class ImagePolicy:
    """Limits on the images a server accepts. Remote fetching is off unless `allow_remote`."""

    allow_remote: bool = False
    allowed_hosts: tuple[str, ...] = ()  # when non-empty, only these host names may be fetched
    allow_private_addresses: bool = False  # True only for tests that fetch from loopback
    max_bytes: int = 20 * MEBIBYTE
    max_pixels: int = 40_000_000
    timeout_s: float = 10.0
    max_redirects: int = 3


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the sha256 of the bytes it came from (the prefix cache keys on it)."""

    image: Image.Image  # mode RGB
    content_hash: str


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL, or an ImageRejectedError saying what is wrong."""
    header, separator, payload = url.partition(",")
    if not separator:
        raise ImageRejectedError("the image data URL has no ',' before its data; expected data:image/png;base64,...")
    media_type, *parameters = header[len("data:") :].split(";")
    if not media_type.strip().lower().startswith("image/"):
        raise ImageRejectedError(
            f"the data URL's media type is {media_type or 'missing'!r}; expected an image type such as image/png"
        )
    if "base64" not in (parameter.strip().lower() for parameter in parameters):
        raise ImageRejectedError("image data URLs must be base64-encoded (data:image/png;base64,...)")
    compact = "".join(payload.split())
    if len(compact) * 3 // 4 > max_bytes:
        raise ImageRejectedError(f"the image is larger than this server's limit of {max_bytes} bytes")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejectedError("the image data URL does not hold valid base64") from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes into an upright RGB image, refusing non-images, corrupt data and too many pixels."""
    try:
        image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
    except Image.DecompressionBombError:
        raise ImageRejectedError(f"the image has more pixels than this server's limit of {max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageRejectedError(
            f"the data is not a recognised image (accepted formats: {', '.join(DECODABLE_FORMATS)})"
        ) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejectedError("the image has no pixels")
    if width * height > max_pixels:
        raise ImageRejectedError(
            f"the image is {width}x{height} = {width * height} pixels, over this server's limit of {max_pixels}"
        )
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        return upright.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ImageRejectedError("the image data is corrupt or truncated") from None


async def _source_bytes(source: bytes | str, policy: ImagePolicy) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, str):
        raise ImageRejectedError(f"an image source must be bytes or a URL string, not {type(source).__name__}")
    url = source.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, policy.max_bytes)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ImageRejectedError(
                "remote image URLs are disabled on this server; send the image inline as a "
                "data:image/...;base64,... URL"
            )
        return await fetch_image_bytes(url, policy)
    accepted = "a data:image/...;base64 URL" + (" or an http(s) URL" if policy.allow_remote else "")
    shown = f"the {scheme!r} scheme" if scheme else "a string that is not a URL"
    raise ImageRejectedError(f"image sources cannot use {shown}; send {accepted}")


async def load_image(source: bytes | str, policy: ImagePolicy) -> LoadedImage:
    """Load one image of a request under `policy`. Decoding runs in a worker thread."""
    data = await _source_bytes(source, policy)
    if not data:
        raise ImageRejectedError("the image is empty")
    if len(data) > policy.max_bytes:
        raise ImageRejectedError(f"the image is {len(data)} bytes, over this server's limit of {policy.max_bytes}")
    image = await asyncio.to_thread(decode_image, data, policy.max_pixels)
    return LoadedImage(image=image, content_hash=hashlib.sha256(data).hexdigest())
