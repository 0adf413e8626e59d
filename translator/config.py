"""The translator's settings, one frozen object built by the CLI (or by tests) and passed to make_app."""

from __future__ import annotations

from dataclasses import dataclass, field

from protoserve.client.channel import TLSOptions

MEBIBYTE = 1024 * 1024


@dataclass(frozen=True)
class TranslatorConfig:
    """Everything the translator needs to know; no environment variable is read anywhere else."""

    upstream: str = "127.0.0.1:50051"
    # Keys clients must send as `Authorization: Bearer KEY`; empty means no check.
    api_keys: tuple[str, ...] = ()
    # Sent upstream as `authorization: Bearer KEY` metadata; None sends nothing.
    upstream_api_key: str | None = None
    upstream_tls: TLSOptions | None = None
    # Origins allowed by CORS; empty turns CORS off (no CORS headers, no preflight answers).
    cors_origins: tuple[str, ...] = ()
    # Most bytes of a request body (JSON or multipart); larger bodies get 413 while being read.
    max_body_bytes: int = 32 * MEBIBYTE
    # Most bytes of one uploaded audio file.
    max_audio_bytes: int = 25 * MEBIBYTE
    # Most images in one request, and most decoded bytes of one base64 data-URL image.
    max_images: int = 16
    max_image_bytes: int = 20 * MEBIBYTE
    # Seconds the health route waits for the upstream's answer.
    health_timeout_seconds: float = 5.0
    # Open paths (exact raw paths) that need no API key; everything else needs one when keys are set.
    open_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/health"}))
