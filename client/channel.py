"""Opening gRPC channels to a protoserve server: TCP, unix sockets, TLS, API keys, many replicas.

Targets take gRPC's own forms: `HOST:PORT`, `unix:/path/to.sock`, `dns:///name:port` (every
address the name resolves to), `ipv4:10.0.0.1:50051,10.0.0.2:50051` (a static list). Channels use
client-side round-robin over the resolved addresses, so many replicas behind a headless Service
share the load instead of one long-lived HTTP/2 connection pinning every call to one pod.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

# Idempotent calls (model listing, tokenize, health) are retried on UNAVAILABLE; generation is not,
# so an in-flight stream whose replica dies surfaces UNAVAILABLE instead of being run twice.
_RETRYABLE_METHODS = [
    {"service": "protoserve.v1.ModelService", "method": "ListModels"},
    {"service": "protoserve.v1.ModelService", "method": "GetModel"},
    {"service": "protoserve.v1.GenerationService", "method": "Tokenize"},
    {"service": "grpc.health.v1.Health", "method": "Check"},
]

SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": _RETRYABLE_METHODS,
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # audio uploads and long prompts exceed gRPC's 4 MiB default


@dataclass(frozen=True)
class TLSOptions:
    """TLS settings of a client channel. All paths are PEM files; client cert and key give mTLS."""

    ca_cert: Path | None = None  # None: the system's roots
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None  # override the name checked against the server's certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


def normalize_target(target: str) -> str:
    """Accept `http://host:port` and bare `host:port` alike; leave gRPC URI schemes untouched."""
    for prefix in ("http://", "grpc://"):
        if target.startswith(prefix):
            return target[len(prefix):].rstrip("/")
    return target


def channel_options(tls: TLSOptions | None = None) -> list[tuple[str, object]]:
    """Options shared by sync and async channels."""
    options: list[tuple[str, object]] = [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def api_key_metadata(api_key: str | None) -> Sequence[tuple[str, str]]:
    """The metadata that carries an API key, or nothing."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def create_channel(target: str, *, tls: TLSOptions | None = None) -> grpc.Channel:
    """A blocking channel to `target` (see the module docstring for its forms)."""
    target = normalize_target(target)
    if tls is None:
        return grpc.insecure_channel(target, options=channel_options())
    return grpc.secure_channel(target, tls.credentials(), options=channel_options(tls))


def create_async_channel(target: str, *, tls: TLSOptions | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `target`; create it inside the event loop that will use it."""
    target = normalize_target(target)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=channel_options())
    return grpc.aio.secure_channel(target, tls.credentials(), options=channel_options(tls))
