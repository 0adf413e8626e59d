"""TLS, mutual TLS and unix sockets, with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from protoserve.server.tls import TLSConfig, TLSConfigError, server_credentials
from protoserve.v1 import models_pb2, models_pb2_grpc

from .runtime_fakes import generation_model, running_server, target


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool
) -> tuple[Pem, x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), subject, key


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    folder: Path

    def write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, ca_name, ca_key = _issue("protoserve test CA", None, ca=True)
    server, _, _ = _issue("localhost", (ca_name, ca_key), ca=False)
    client, _, _ = _issue("client", (ca_name, ca_key), ca=False)
    return Pki(ca, server, client, tmp_path_factory.mktemp("pki"))


async def _list(channel: grpc.aio.Channel) -> list[str]:
    stub = models_pb2_grpc.ModelServiceStub(channel)
    response = await stub.ListModels(models_pb2.ListModelsRequest(), timeout=3)
    return [model.id for model in response.models]


async def test_tls_connects_and_plaintext_fails(pki: Pki) -> None:
    tls = TLSConfig(Path(pki.write("server.pem", pki.server.cert)), Path(pki.write("server.key", pki.server.key)))
    async with running_server([generation_model("tiny")], tls=tls, warm_up=False) as running:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
        async with grpc.aio.secure_channel(target(running), credentials) as channel:
            assert await _list(channel) == ["tiny"]
        async with grpc.aio.insecure_channel(target(running)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _list(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(pki: Pki) -> None:
    tls = TLSConfig(
        Path(pki.write("server.pem", pki.server.cert)),
        Path(pki.write("server.key", pki.server.key)),
        Path(pki.write("ca.pem", pki.ca.cert)),
    )
    async with running_server([generation_model("tiny")], tls=tls, warm_up=False) as running:
        with_client_cert = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
        async with grpc.aio.secure_channel(target(running), with_client_cert) as channel:
            assert await _list(channel) == ["tiny"]
        without_client_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
        async with grpc.aio.secure_channel(target(running), without_client_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _list(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_flags_and_files_are_checked(pki: Pki, tmp_path: Path) -> None:
    assert TLSConfig.from_flags(None, None, None) is None
    with pytest.raises(TLSConfigError, match="both --tls-cert and --tls-key"):
        TLSConfig.from_flags("cert.pem", None, None)
    with pytest.raises(TLSConfigError, match="--tls-client-ca needs"):
        TLSConfig.from_flags(None, None, "ca.pem")
    missing = TLSConfig(tmp_path / "nope.pem", tmp_path / "nope.key")
    with pytest.raises(TLSConfigError, match="--tls-cert: cannot read"):
        server_credentials(missing)
    not_pem = tmp_path / "garbage.pem"
    not_pem.write_bytes(b"hello")
    with pytest.raises(TLSConfigError, match="not a PEM file"):
        server_credentials(TLSConfig(not_pem, not_pem))


async def test_unix_socket_only(tmp_path: Path) -> None:
    socket_path = tmp_path / "protoserve.sock"
    async with running_server(
        [generation_model("tiny")], port=None, unix_socket=str(socket_path), warm_up=False
    ) as running:
        assert running.addresses == [f"unix:{socket_path}"]
        assert running.ports == []
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            assert await _list(channel) == ["tiny"]


async def test_tcp_and_unix_socket_together(tmp_path: Path) -> None:
    socket_path = tmp_path / "both.sock"
    async with running_server([generation_model("tiny")], unix_socket=str(socket_path), warm_up=False) as running:
        assert running.addresses == [target(running), f"unix:{socket_path}"]
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            assert await _list(channel) == ["tiny"]


async def test_a_port_in_use_is_an_error_not_a_shared_listener() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises((RuntimeError, OSError)):
            async with running_server([generation_model("tiny")], port=port, warm_up=False):
                pass
