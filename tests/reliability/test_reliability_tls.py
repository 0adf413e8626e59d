"""TLS and mTLS between the translator and the server, end to end; plaintext against TLS fails."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve.client.channel import TLSOptions, create_async_channel
from protoserve.server.tls import TLSConfig
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.server import start_translator

from reliability.clients import chat_body, streamed_chat, unlimited_session
from reliability.pki import ThrowawayAuthority, create_test_authority
from reliability.recorder import ReliabilityRecorder
from reliability.stack import in_process_stack


async def _chat_status(upstream: str, tls: TLSOptions | None) -> int:
    translator = await start_translator(TranslatorConfig(upstream=upstream, upstream_tls=tls))
    try:
        async with unlimited_session(timeout_s=30) as session:
            outcome = await streamed_chat(session, f"{translator.url}/v1", chat_body("tiny", "w1 w2", 4))
            return outcome.status
    finally:
        await translator.stop()


async def _health_fails(target: str, tls: TLSOptions | None) -> bool:
    channel = create_async_channel(target, tls=tls) if tls else grpc.aio.insecure_channel(target)
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.aio.AioRpcError as error:
            return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


async def test_tls_and_mutual_tls_end_to_end(
    tiny_model_folder: Path, tmp_path: Path, reliability_recorder: ReliabilityRecorder
) -> None:
    authority = create_test_authority(tmp_path / "pki")
    stranger: ThrowawayAuthority = create_test_authority(tmp_path / "other-pki", name="someone else's CA")
    server_only = TLSConfig(authority.server.certificate, authority.server.key)
    mutual = TLSConfig(authority.server.certificate, authority.server.key, client_ca_file=authority.ca_certificate)
    verified = TLSOptions(ca_cert=authority.ca_certificate)
    with_client_certificate = TLSOptions(
        ca_cert=authority.ca_certificate, client_cert=authority.client.certificate, client_key=authority.client.key
    )
    foreign_client_certificate = TLSOptions(
        ca_cert=authority.ca_certificate, client_cert=stranger.client.certificate, client_key=stranger.client.key
    )
    checks = 0
    async with in_process_stack(tiny_model_folder, tls=server_only) as stack:
        assert await _chat_status(stack.grpc_target, verified) == 200
        assert await _chat_status(stack.grpc_target, None) == 503, "plaintext against TLS must fail"
        assert await _health_fails(stack.grpc_target, None)
        assert await _health_fails(stack.grpc_target, TLSOptions(ca_cert=stranger.ca_certificate))
        checks += 4
    async with in_process_stack(tiny_model_folder, tls=mutual) as stack:
        assert await _chat_status(stack.grpc_target, with_client_certificate) == 200
        assert await _chat_status(stack.grpc_target, verified) == 503, "mTLS without a client certificate must fail"
        assert await _health_fails(stack.grpc_target, foreign_client_certificate)
        assert await _health_fails(stack.grpc_target, None)
        checks += 4
    reliability_recorder.record(
        "security.tls",
        "Security",
        "TLS and mTLS between translator and server served chats; plaintext, an unknown CA, a missing "
        "or foreign client certificate were all refused",
        inputs_tried=checks,
        bypasses=0,
    )
