"""Fetch a remote image without letting the server be used to reach internal addresses (SSRF).

Invariants, for every hop of a request (the first URL and each redirect target):
- the scheme is http or https, the URL carries no credentials, and the host is on the policy's
  allow-list when it has one;
- the host is resolved exactly once, here, and every address it resolves to is checked; the
  connection is then made to those checked addresses (aiohttp gets them through `_CheckedResolver`),
  so a DNS answer that changes between check and connect (rebinding) cannot slip through;
- redirects are followed by hand, at most `max_redirects`, each target checked like the first URL;
- the body is read in chunks and reading stops as soon as it passes `max_bytes`; a declared
  Content-Length over the limit is refused before reading anything;
- the whole fetch, redirects included, ends within `timeout_s`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from protoserve.server.media.address_policy import IPAddress, blocked_address_reason
from protoserve.server.media.errors import ImageFetchError
from yarl import URL

if TYPE_CHECKING:
    from protoserve.server.media.images import ImagePolicy

# Resolves (host, port) to IP address strings. Tests inject a stub; the default asks the system.
HostResolver = Callable[[str, int], Awaitable[list[str]]]
# Returns why an address is refused, or None when it may be connected to.
AddressCheck = Callable[[IPAddress], "str | None"]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK_BYTES = 64 * 1024


async def system_resolve(host: str, port: int) -> list[str]:
    """Resolve with the system resolver (getaddrinfo), off the event loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def policy_address_check(policy: ImagePolicy) -> AddressCheck:
    """The address check a policy asks for: everything allowed, or public addresses only."""
    if policy.allow_private_addresses:
        return lambda address: None
    return blocked_address_reason


def _parse_address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id


class _CheckedResolver(AbstractResolver):
    """Resolves once, refuses the host if any of its addresses is refused, returns the checked ones."""

    def __init__(self, resolve: HostResolver, address_check: AddressCheck) -> None:
        self._resolve = resolve
        self._address_check = address_check

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            address_texts = await self._resolve(host, port)
        except OSError as error:
            raise ImageFetchError(f"could not resolve the image host {host!r}: {error.strerror or error}") from None
        if not address_texts:
            raise ImageFetchError(f"the image host {host!r} has no address")
        results: list[ResolveResult] = []
        for text in address_texts:
            address = _parse_address(text)
            reason = self._address_check(address)
            if reason is not None:
                raise ImageFetchError(f"refusing to fetch an image from {host!r}: it resolves to {address}, {reason}")
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(address),
                    port=port,
                    family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        return results

    async def close(self) -> None:
        return None


def _check_url(url: URL, policy: ImagePolicy, address_check: AddressCheck) -> None:
    """Refuse a hop's URL before any connection: scheme, credentials, allow-list, literal IPs."""
    if url.scheme not in ("http", "https"):
        raise ImageFetchError(f"image URLs must be http or https, not {url.scheme or 'a relative URL'!r}")
    if url.user is not None or url.password is not None:
        raise ImageFetchError("image URLs with credentials (user:password@) are not accepted")
    host = (url.host or "").rstrip(".").lower()
    if not host:
        raise ImageFetchError(f"the image URL {str(url)!r} has no host")
    if policy.allowed_hosts and host not in {allowed.lower() for allowed in policy.allowed_hosts}:
        raise ImageFetchError(
            f"the image host {host!r} is not on this server's allow-list ({', '.join(policy.allowed_hosts)})"
        )
    try:
        literal = _parse_address(host)
    except ValueError:
        return  # a name: checked when it is resolved
    reason = address_check(literal)
    if reason is not None:
        raise ImageFetchError(f"refusing to fetch an image from {literal}: {reason}")


async def _read_limited(response: aiohttp.ClientResponse, max_bytes: int, host: str) -> bytes:
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise ImageFetchError(
            f"the image at {host!r} is {declared} bytes, over this server's limit of {max_bytes} bytes"
        )
    received = bytearray()
    async for chunk in response.content.iter_chunked(_READ_CHUNK_BYTES):
        received += chunk
        if len(received) > max_bytes:
            raise ImageFetchError(f"the image at {host!r} is over this server's limit of {max_bytes} bytes")
    return bytes(received)


async def _fetch_following_redirects(
    session: aiohttp.ClientSession, url: URL, policy: ImagePolicy, address_check: AddressCheck
) -> bytes:
    for _hop in range(policy.max_redirects + 1):
        _check_url(url, policy, address_check)
        async with session.get(url, allow_redirects=False) as response:
            if response.status in _REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise ImageFetchError(f"the image host {url.host!r} sent a redirect without a Location")
                url = url.join(URL(location))
                continue
            if response.status != 200:
                raise ImageFetchError(f"fetching the image from {url.host!r} failed: HTTP {response.status}")
            return await _read_limited(response, policy.max_bytes, url.host or "")
    raise ImageFetchError(f"the image URL redirected more than {policy.max_redirects} times")


async def fetch_image_bytes(
    url: str,
    policy: ImagePolicy,
    *,
    resolve: HostResolver = system_resolve,
    address_check: AddressCheck | None = None,
) -> bytes:
    """Download the bytes at `url` under `policy` (see the module docstring for the guarantees).

    `resolve` and `address_check` default to the system resolver and the policy's check; tests
    replace them. Every failure is an `ImageFetchError` whose message says what to change.
    """
    check = address_check or policy_address_check(policy)
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise ImageFetchError("the image URL is not a valid URL") from None
    connector = aiohttp.TCPConnector(resolver=_CheckedResolver(resolve, check), use_dns_cache=False, force_close=True)
    headers = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "protoserve-image-fetch"}
    try:
        async with asyncio.timeout(policy.timeout_s):
            async with aiohttp.ClientSession(
                connector=connector, headers=headers, trust_env=False, auto_decompress=False
            ) as session:
                return await _fetch_following_redirects(session, parsed, policy, check)
    except TimeoutError:
        raise ImageFetchError(f"fetching the image took longer than {policy.timeout_s} s") from None
    except aiohttp.ClientError as error:
        raise ImageFetchError(f"could not fetch the image from {parsed.host!r}: {type(error).__name__}") from None
