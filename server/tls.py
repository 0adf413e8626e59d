"""TLS and mutual TLS for the gRPC listener.

A certificate and its key give TLS; a client CA on top requires every client to present a
certificate signed by that CA (mTLS). Files are read once at startup; unreadable or missing
files are configuration errors with the path and the flag named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


class TLSConfigError(ValueError):
    """The TLS flags do not make a usable configuration."""


@dataclass(frozen=True)
class TLSConfig:
    """PEM files of the server's TLS identity, and the CA that signs client certificates for mTLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    @staticmethod
    def from_flags(cert: str | None, key: str | None, client_ca: str | None) -> TLSConfig | None:
        """None without TLS flags; an error when the flags are incomplete."""
        if cert is None and key is None:
            if client_ca is not None:
                raise TLSConfigError("--tls-client-ca needs --tls-cert and --tls-key too")
            return None
        if cert is None or key is None:
            raise TLSConfigError("TLS needs both --tls-cert and --tls-key")
        return TLSConfig(Path(cert), Path(key), Path(client_ca) if client_ca is not None else None)


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{flag}: cannot read {str(path)!r}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"{flag}: {str(path)!r} is not a PEM file")
    return data


def server_credentials(config: TLSConfig) -> grpc.ServerCredentials:
    """Credentials for `server.add_secure_port`; with a client CA, client certificates are required."""
    certificate_chain = _read_pem(config.cert_file, "--tls-cert")
    private_key = _read_pem(config.key_file, "--tls-key")
    root_certificates = None
    if config.client_ca_file is not None:
        root_certificates = _read_pem(config.client_ca_file, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)],
        root_certificates=root_certificates,
        require_client_auth=config.mutual,
    )
