"""Image URLs cannot reach internal addresses (SSRF), through the whole REST -> gRPC -> fetch path.

The vision demo model serves with remote images on. The image fetcher's resolver is replaced by a
stub (names -> addresses chosen here), and 127.0.0.1 plays "the public internet": a local image
server on it is allowed, every other loopback, private, link-local or metadata address is refused,
whether written literally, behind a DNS name, or reached through a redirect. Size caps cut a download
while it streams.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from protoserve.server.engine.api import EngineConfig
from protoserve.server.media import images as image_loading
from protoserve.server.media.address_policy import IPAddress, blocked_address_reason
from protoserve.server.media.images import ImagePolicy
from protoserve.server.media.safe_fetch import fetch_image_bytes

from reliability.clients import unlimited_session
from reliability.recorder import ReliabilityRecorder
from reliability.stack import InProcessStack, in_process_stack

if TYPE_CHECKING:
    from protoserve.server.demo_models import DemoModels

MAX_IMAGE_BYTES = 256 * 1024
ENDLESS_BYTES = 64 << 20  # what /endless sends if nobody stops reading
STUB_DNS = {
    "public.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "intranet.test": ["10.0.0.5"],
    "loopback.test": ["127.0.0.2"],
    "rebind.test": ["127.0.0.1", "192.168.1.7"],
    "mapped.test": ["::ffff:127.0.0.2"],
}


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _stub_resolve(host: str, port: int) -> list[str]:
    if host not in STUB_DNS:
        raise OSError(f"stub resolver: no such host {host}")
    return STUB_DNS[host]


def _only_127_0_0_1_is_public(address: IPAddress) -> str | None:
    return None if str(address) == "127.0.0.1" else blocked_address_reason(address)


class ImageHost:
    """A local HTTP server: an image, redirects to internal places, and an endless body."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.endless_bytes_sent = 0
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/image.png", self.image)
        app.router.add_get("/to/{target:.+}", self.redirect)
        app.router.add_get("/endless", self.endless)
        app.router.add_get("/declared-huge", self.declared_huge)
        return app

    async def image(self, request: web.Request) -> web.Response:
        self.hits["image"] += 1
        return web.Response(body=_png(), content_type="image/png")

    async def redirect(self, request: web.Request) -> web.Response:
        self.hits["redirect"] += 1
        raise web.HTTPFound("http://" + request.match_info["target"])

    async def endless(self, request: web.Request) -> web.StreamResponse:
        self.hits["endless"] += 1
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        chunk = b"\x00" * 65536
        try:
            for _ in range(ENDLESS_BYTES // len(chunk)):
                await response.write(chunk)
                self.endless_bytes_sent += len(chunk)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    async def declared_huge(self, request: web.Request) -> web.Response:
        self.hits["declared-huge"] += 1
        return web.Response(body=b"\x00" * (MAX_IMAGE_BYTES + 1), content_type="image/png")


@pytest.fixture
async def image_host() -> AsyncIterator[ImageHost]:
    host = ImageHost()
    runner = web.AppRunner(host.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host.port = runner.addresses[0][1]
    yield host
    await runner.cleanup()


@pytest.fixture
async def vision_stack(demo_models: DemoModels, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[InProcessStack]:
    monkeypatch.setattr(
        image_loading,
        "fetch_image_bytes",
        functools.partial(fetch_image_bytes, resolve=_stub_resolve, address_check=_only_127_0_0_1_is_public),
    )
    policy = ImagePolicy(allow_remote=True, max_bytes=MAX_IMAGE_BYTES, timeout_s=10)
    async with in_process_stack(
        Path(demo_models.vision), EngineConfig(kv_cache_bytes=64 << 20), model_id="vision", image_policy=policy
    ) as stack:
        yield stack


async def _chat_with_image(stack: InProcessStack, url: str) -> tuple[int, str]:
    body = {
        "model": "vision",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe."}, {"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": 1,
        "temperature": 0,
    }  # fmt: skip
    async with unlimited_session() as session:
        async with session.post(f"{stack.base_url}/chat/completions", json=body) as response:
            return response.status, await response.text()


async def test_internal_image_urls_are_refused(
    vision_stack: InProcessStack, image_host: ImageHost, reliability_recorder: ReliabilityRecorder
) -> None:
    public = f"public.test:{image_host.port}"
    status, text = await _chat_with_image(vision_stack, f"http://{public}/image.png")
    assert status == 200, f"the allowed image must work, or the refusals below prove nothing: {text}"

    internal = [
        "http://127.0.0.2/x.png", "http://[::1]/x.png", "http://10.1.2.3/x.png", "http://192.168.0.1/x.png",
        "http://172.16.5.4/x.png", "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
        "http://0.0.0.0/x.png", "http://100.64.0.1/x.png", "http://[::ffff:10.0.0.1]/x.png",
        "http://metadata.test/latest/meta-data/", "http://intranet.test/x.png", "http://loopback.test/x.png",
        f"http://rebind.test:{image_host.port}/image.png", f"http://mapped.test:{image_host.port}/image.png",
        f"http://{public}/to/169.254.169.254/latest/meta-data/", f"http://{public}/to/intranet.test/x.png",
        f"http://{public}/to/127.0.0.2:{image_host.port}/image.png",
        f"http://{public}/to/{public}/to/{public}/to/{public}/to/{public}/image.png",  # too many redirects
        f"http://user:pass@{public}/image.png", "file:///etc/passwd", f"ftp://{public}/image.png",
    ]  # fmt: skip
    for url in internal:
        status, text = await _chat_with_image(vision_stack, url)
        assert status == 400, f"{url}: {status} {text}"
        assert "Traceback" not in text
    assert image_host.hits["image"] == 1, "no refused URL reached the image server's image"

    status, text = await _chat_with_image(vision_stack, f"http://{public}/endless")
    assert status == 400 and str(MAX_IMAGE_BYTES) in text, text
    # Loopback socket buffers absorb a few MB after the fetcher stops reading; far less than the 64 MB on offer.
    assert image_host.endless_bytes_sent < ENDLESS_BYTES // 4, "the download was cut while streaming"
    status, text = await _chat_with_image(vision_stack, f"http://{public}/declared-huge")
    assert status == 400 and str(MAX_IMAGE_BYTES) in text, text

    reliability_recorder.record(
        "security.image_urls",
        "Security",
        "image URLs to loopback, private, link-local, CGNAT and metadata addresses were refused, written "
        "literally, behind DNS names, or through redirects; downloads over the size cap were cut while streaming",
        inputs_tried=len(internal) + 2,
        bypasses=0,
        bytes_sent_before_cut=image_host.endless_bytes_sent,
    )
