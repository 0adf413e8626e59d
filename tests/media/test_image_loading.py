"""load_image: raw bytes, data URLs, decoding limits, and the refusals that protect the server."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from PIL import Image
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.media.errors import ImageRejectedError
from protoserve.server.media.images import ImagePolicy, load_image


def _png_bytes(size: tuple[int, int] = (4, 3), mode: str = "RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=(10, 20, 30, 255) if mode == "RGBA" else 7).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_raw_bytes_load_as_rgb_with_content_hash() -> None:
    data = _png_bytes()
    loaded = await load_image(data, ImagePolicy())
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (4, 3)
    assert loaded.image.getpixel((0, 0)) == (10, 20, 30)
    assert loaded.content_hash == hashlib.sha256(data).hexdigest()


async def test_data_url_decodes_and_hashes_the_decoded_bytes() -> None:
    data = _png_bytes(mode="L")
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    loaded = await load_image(url, ImagePolicy())
    assert loaded.image.mode == "RGB"
    assert loaded.content_hash == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("data:image/png;base64,@@@not-base64@@@", "valid base64"),
        ("data:image/png;base64", "no ','"),
        ("data:text/plain;base64,aGVsbG8=", "media type"),
        ("data:image/png,rawtext", "base64-encoded"),
        ("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), "not a recognised image"),
        ("file:///etc/passwd", "'file' scheme"),
        ("ftp://example.com/cat.png", "'ftp' scheme"),
        ("just some text", "not a URL"),
        ("https://example.com/cat.png", "remote image URLs are disabled"),
        (b"", "empty"),
        (b"GIF89a-truncated", "not a recognised image"),
    ],
)
async def test_bad_sources_are_refused_with_a_clear_message(source: bytes | str, expected: str) -> None:
    with pytest.raises(ImageRejectedError, match=expected) as caught:
        await load_image(source, ImagePolicy())
    assert isinstance(caught.value, InvalidRequestError)


async def test_truncated_png_is_reported_as_corrupt() -> None:
    big = io.BytesIO()
    Image.effect_noise((64, 64), 40).save(big, format="PNG")
    with pytest.raises(ImageRejectedError, match="corrupt or truncated|not a recognised image"):
        await load_image(big.getvalue()[:200], ImagePolicy())


async def test_too_many_pixels_refused_from_the_header() -> None:
    data = _png_bytes(size=(300, 200))
    with pytest.raises(ImageRejectedError, match="60000 pixels"):
        await load_image(data, ImagePolicy(max_pixels=50_000))


async def test_decompression_bomb_refused_before_decoding() -> None:
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, format="PNG")  # 400 megapixels, a few kB compressed
    assert len(buffer.getvalue()) < 200_000
    with pytest.raises(ImageRejectedError, match="pixels"):
        await load_image(buffer.getvalue(), ImagePolicy())


async def test_byte_limit_applies_to_raw_and_data_url_sources() -> None:
    data = _png_bytes(size=(64, 64))
    policy = ImagePolicy(max_bytes=len(data) - 1)
    with pytest.raises(ImageRejectedError, match="limit"):
        await load_image(data, policy)
    with pytest.raises(ImageRejectedError, match="limit"):
        await load_image("data:image/png;base64," + base64.b64encode(data * 2).decode(), policy)


async def test_eps_is_not_decoded() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageRejectedError, match="not a recognised image"):
        await load_image(eps, ImagePolicy())


async def test_wrong_source_type_is_refused() -> None:
    with pytest.raises(ImageRejectedError, match="bytes or a URL string"):
        await load_image(123, ImagePolicy())  # type: ignore[arg-type]


async def test_exif_rotation_is_applied() -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), color=(0, 0, 255)).save(buffer, format="JPEG", exif=exif)
    loaded = await load_image(buffer.getvalue(), ImagePolicy())
    assert loaded.image.size == (20, 40)
    assert loaded.image.mode == "RGB"
