"""API keys: missing, wrong and right keys; health and reflection stay open."""

from __future__ import annotations

import logging

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protoserve.server.auth import ApiKeyChecker, bearer_token, read_api_key_file
from protoserve.v1 import models_pb2, models_pb2_grpc

from .runtime_fakes import generation_model, running_server, target

KEYS = ("first-key-0123", "second-key-4567")


def test_bearer_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", b"Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert bearer_token(None) is None


def test_checker_accepts_only_configured_keys() -> None:
    checker = ApiKeyChecker(KEYS)
    assert checker.accepts("second-key-4567")
    assert not checker.accepts("second-key-456")
    assert not checker.accepts("")
    assert "key-" not in repr(checker)
    with pytest.raises(ValueError):
        ApiKeyChecker(["ok", "  "])


def test_key_file_skips_blank_and_comment_lines(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys"
    path.write_text("# team keys\nalpha\n\n  beta  \n")
    assert read_api_key_file(path) == ["alpha", "beta"]
    with pytest.raises(ValueError, match="cannot read"):
        read_api_key_file(tmp_path / "missing")


async def _list_models(channel: grpc.aio.Channel, key: str | None) -> models_pb2.ListModelsResponse:
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else None
    stub = models_pb2_grpc.ModelServiceStub(channel)
    return await stub.ListModels(models_pb2.ListModelsRequest(), metadata=metadata, timeout=5)


async def test_calls_need_a_valid_key_but_health_does_not(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_server([generation_model("tiny")], api_keys=KEYS, warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await _list_models(channel, None)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in (missing.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await _list_models(channel, "not-a-key-at-all")
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "not-a-key" not in (wrong.value.details() or "")
            listed = await _list_models(channel, KEYS[1])
            assert [model.id for model in listed.models] == ["tiny"]
            health = health_pb2_grpc.HealthStub(channel)
            response = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert KEYS[1] not in logged and "not-a-key-at-all" not in logged
