"""Which IP addresses a server-side fetch may connect to (the SSRF guard).

Only globally routable unicast addresses are allowed. Loopback, private (RFC 1918), link-local
(including the cloud metadata address 169.254.169.254), multicast, reserved, unspecified, CGNAT
(100.64.0.0/10), unique-local IPv6 (fc00::/7) and site-local IPv6 are refused. IPv6 forms that embed
an IPv4 address (IPv4-mapped, 6to4, NAT64) are judged by the embedded address.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CLOUD_METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_UNIQUE_LOCAL_IPV6 = ipaddress.ip_network("fc00::/7")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden inside an IPv4-mapped, 6to4 or NAT64 IPv6 address, if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def blocked_address_reason(address: IPAddress) -> str | None:
    """Why a fetch must not connect to `address`, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = blocked_address_reason(embedded)
            return None if reason is None else f"{reason} (embedded in {address})"
    if address in CLOUD_METADATA_ADDRESSES:
        return "the cloud metadata address"
    checks: tuple[tuple[bool, str], ...] = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (isinstance(address, ipaddress.IPv4Address) and address in _CARRIER_GRADE_NAT, "a CGNAT address"),
        (isinstance(address, ipaddress.IPv6Address) and address in _UNIQUE_LOCAL_IPV6, "a unique-local IPv6 address"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "a site-local address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
    )
    for matches, reason in checks:
        if matches:
            return reason
    if not address.is_global:
        return "not a public address"
    return None
