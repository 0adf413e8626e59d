"""Remote images: fetched from a loopback aiohttp server, with every SSRF and size guard exercised."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from PIL import Image
from protoserve.server.media.address_policy import IPAddress, blocked_address_reason
from protoserve.server.media.errors import ImageFetchError
from protoserve.server.media.images import ImagePolicy, load_image
from protoserve.server.media.safe_fetch import fetch_image_bytes


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5), color=(200, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class ImageServer:
    base: str
    port: int
    streamed_bytes: list[int] = field(default_factory=list)


async def _handle_image(request: web.Request) -> web.Response:
    return web.Response(body=_png(), content_type="image/png")


async def _handle_missing(request: web.Request) -> web.Response:
    return web.Response(status=404)


def _redirect_to(location: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound(location=location)

    return handler


@pytest.fixture
async def image_server() -> AsyncIterator[ImageServer]:
    app = web.Application()
    state = ImageServer(base="", port=0)

    async def handle_huge_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "image/png"
        await response.prepare(request)
        sent = 0
        try:
            for _ in range(1024):  # up to 64 MiB, without a Content-Length
                await response.write(b"\0" * 65536)
                sent += 65536
        except (ConnectionResetError, ConnectionError, RuntimeError):
            pass
        finally:
            state.streamed_bytes.append(sent)
        return response

    async def handle_declared_huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(10**9)})
        await response.prepare(request)
        await response.write(b"\0" * 1024)
        return response

    async def handle_slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=_png())

    app.router.add_get("/cat.png", _handle_image)
    app.router.add_get("/huge-stream", handle_huge_stream)
    app.router.add_get("/declared-huge", handle_declared_huge)
    app.router.add_get("/slow", handle_slow)
    app.router.add_get("/to-private", _redirect_to("http://10.0.0.7/cat.png"))
    app.router.add_get("/to-metadata", _redirect_to("http://169.254.169.254/latest/meta-data/"))
    app.router.add_get("/to-cat", _redirect_to("/cat.png"))
    app.router.add_get("/loop", _redirect_to("/loop"))
    app.router.add_get("/to-file", _redirect_to("file:///etc/passwd"))
    app.router.add_get("/missing", _handle_missing)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.base, state.port = f"http://127.0.0.1:{port}", port
    yield state
    await runner.cleanup()


def _loopback_only(address: IPAddress) -> str | None:
    """Lets the test reach its own loopback server while every other address gets the real check."""
    return None if str(address) == "127.0.0.1" else blocked_address_reason(address)


LOOPBACK_POLICY = ImagePolicy(allow_remote=True, allow_private_addresses=True)


async def test_fetches_an_image_over_http(image_server: ImageServer) -> None:
    loaded = await load_image(f"{image_server.base}/cat.png", LOOPBACK_POLICY)
    assert loaded.image.size == (5, 5)


async def test_follows_a_redirect_to_an_allowed_target(image_server: ImageServer) -> None:
    loaded = await load_image(f"{image_server.base}/to-cat", LOOPBACK_POLICY)
    assert loaded.image.getpixel((0, 0)) == (200, 0, 0)


async def test_loopback_refused_without_private_addresses(image_server: ImageServer) -> None:
    with pytest.raises(ImageFetchError, match="loopback"):
        await load_image(f"{image_server.base}/cat.png", ImagePolicy(allow_remote=True))


@pytest.mark.parametrize(("path", "reason"), [("/to-private", "private"), ("/to-metadata", "metadata")])
async def test_redirect_to_internal_address_refused(image_server: ImageServer, path: str, reason: str) -> None:
    with pytest.raises(ImageFetchError, match=reason):
        await fetch_image_bytes(
            f"{image_server.base}{path}", ImagePolicy(allow_remote=True), address_check=_loopback_only
        )


async def test_redirect_to_another_scheme_refused(image_server: ImageServer) -> None:
    with pytest.raises(ImageFetchError, match="http or https"):
        await fetch_image_bytes(f"{image_server.base}/to-file", LOOPBACK_POLICY)


async def test_redirect_loop_stops_at_the_limit(image_server: ImageServer) -> None:
    with pytest.raises(ImageFetchError, match="more than 2 times"):
        await fetch_image_bytes(
            f"{image_server.base}/loop", ImagePolicy(allow_remote=True, allow_private_addresses=True, max_redirects=2)
        )


async def test_oversized_stream_is_cut_before_it_is_fully_read(image_server: ImageServer) -> None:
    policy = ImagePolicy(allow_remote=True, allow_private_addresses=True, max_bytes=256 * 1024)
    with pytest.raises(ImageFetchError, match="over this server's limit"):
        await fetch_image_bytes(f"{image_server.base}/huge-stream", policy)
    for _ in range(100):
        if image_server.streamed_bytes:
            break
        await asyncio.sleep(0.02)
    assert image_server.streamed_bytes and image_server.streamed_bytes[0] < 64 * 1024 * 1024


async def test_declared_oversize_refused_before_reading(image_server: ImageServer) -> None:
    policy = ImagePolicy(allow_remote=True, allow_private_addresses=True, max_bytes=1024 * 1024)
    with pytest.raises(ImageFetchError, match="1000000000 bytes"):
        await fetch_image_bytes(f"{image_server.base}/declared-huge", policy)


async def test_slow_server_times_out(image_server: ImageServer) -> None:
    policy = ImagePolicy(allow_remote=True, allow_private_addresses=True, timeout_s=0.3)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ImageFetchError, match="longer than 0.3 s"):
        await fetch_image_bytes(f"{image_server.base}/slow", policy)
    assert asyncio.get_running_loop().time() - started < 2


async def test_http_error_status_is_reported(image_server: ImageServer) -> None:
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        await fetch_image_bytes(f"{image_server.base}/missing", LOOPBACK_POLICY)


async def test_host_outside_the_allow_list_refused(image_server: ImageServer) -> None:
    policy = ImagePolicy(allow_remote=True, allow_private_addresses=True, allowed_hosts=("images.example.com",))
    with pytest.raises(ImageFetchError, match="allow-list"):
        await fetch_image_bytes(f"{image_server.base}/cat.png", policy)


async def test_name_resolving_to_private_address_refused_without_connecting() -> None:
    calls: list[str] = []

    async def resolve_to_private(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["93.184.216.34", "10.1.2.3"]  # one public, one private: the host is refused

    with pytest.raises(ImageFetchError, match=r"resolves to 10\.1\.2\.3, a private address"):
        await fetch_image_bytes(
            "http://internal.example/cat.png", ImagePolicy(allow_remote=True), resolve=resolve_to_private
        )
    assert calls == ["internal.example"]


async def test_name_is_resolved_once_and_the_checked_address_is_used(image_server: ImageServer) -> None:
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])  # a rebinding resolver: the second answer would be private
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    data = await fetch_image_bytes(
        f"http://pictures.example:{image_server.port}/cat.png",
        ImagePolicy(allow_remote=True),
        resolve=rebinding,
        address_check=_loopback_only,
    )
    assert data == _png()
    assert calls == ["pictures.example"]


async def test_system_resolver_answer_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, port: object, *args: object, **kwargs: object) -> list[tuple]:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd12:3456::1", 80, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(ImageFetchError, match="unique-local"):
        await load_image("http://cdn.example/cat.png", ImagePolicy(allow_remote=True))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://100.64.1.1/x.png", "CGNAT"),
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://user:secret@example.com/x.png", "credentials"),
    ],
)
async def test_literal_internal_addresses_refused(url: str, reason: str) -> None:
    with pytest.raises(ImageFetchError, match=reason):
        await fetch_image_bytes(url, ImagePolicy(allow_remote=True))
