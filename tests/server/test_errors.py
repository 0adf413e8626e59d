"""Each exception maps onto one status; INTERNAL says nothing about the server's insides."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import grpc.aio
import pytest
from protoserve.server.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    KVCacheExhaustedError,
    ModelLoadError,
    PromptTooLongError,
    RequestFailedError,
    UnsupportedModelError,
)
from protoserve.server.errors import (
    MAX_STATUS_MESSAGE_CHARS,
    ModelNotFoundError,
    ServerDrainingError,
    ServerPermissionError,
    abort_for_exception,
    rpc_errors,
    status_for_exception,
)

from .runtime_fakes import FakeEngine, generation_model, running_server, target

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("exc", "code", "message_part"),
    [
        (InvalidRequestError("temperature 3 is outside [0, 2]"), Code.INVALID_ARGUMENT, "temperature 3"),
        (PromptTooLongError(100, 50, 120), Code.INVALID_ARGUMENT, "context length is 120"),
        (UnsupportedModelError("encoder-decoder models are not supported"), Code.INVALID_ARGUMENT, "encoder"),
        (ModelLoadError("no folder at /models/x"), Code.INVALID_ARGUMENT, "no folder"),
        (ModelNotFoundError("gpt-9", ["tiny", "whisper"]), Code.NOT_FOUND, "'tiny', 'whisper'"),
        (EngineOverloadedError(300, 256), Code.RESOURCE_EXHAUSTED, "300 requests waiting"),
        (KVCacheExhaustedError("the request needs 900 blocks; the cache has 100"), Code.RESOURCE_EXHAUSTED, "900"),
        (EngineDeadError("the engine stopped"), Code.UNAVAILABLE, "engine stopped"),
        (ServerDrainingError("shutting down"), Code.UNAVAILABLE, "shutting down"),
        (ServerPermissionError("loading is disabled"), Code.PERMISSION_DENIED, "loading is disabled"),
        (PermissionError(13, "Permission denied", "/srv/secret"), Code.PERMISSION_DENIED, "permission denied"),
        (TimeoutError(), Code.DEADLINE_EXCEEDED, "ran out of time"),
        (RequestFailedError("CUDA error at 0x7f00"), Code.INTERNAL, "internal error (request id req-1)"),
        (KeyError("secret"), Code.INTERNAL, "internal error (request id req-1)"),
    ],
)
def test_each_exception_maps_onto_one_status(exc: Exception, code: grpc.StatusCode, message_part: str) -> None:
    status = status_for_exception(exc, "req-1")
    assert status.code == code
    assert message_part in status.message


def test_only_overload_carries_a_retry_after_in_whole_seconds() -> None:
    assert status_for_exception(EngineOverloadedError(3, 2, retry_after_s=2.2), "r").trailing_metadata == (
        ("retry-after", "3"),
    )
    assert status_for_exception(EngineOverloadedError(3, 2, retry_after_s=0.01), "r").trailing_metadata == (
        ("retry-after", "1"),
    )
    assert status_for_exception(KVCacheExhaustedError("x"), "r").trailing_metadata == ()


def test_internal_errors_hide_paths_and_addresses() -> None:
    status = status_for_exception(RuntimeError("<object at 0x7f3a2b> in /srv/app/server.py"), "req-9")
    assert status.message == "internal error (request id req-9)"
    os_status = status_for_exception(PermissionError(13, "denied", "/etc/shadow"), "req-9")
    assert "/etc" not in os_status.message


def test_long_caller_messages_are_cut() -> None:
    status = status_for_exception(InvalidRequestError("x" * 10_000), "r")
    assert len(status.message) == MAX_STATUS_MESSAGE_CHARS


class _RecordingContext:
    def __init__(self) -> None:
        self.aborted: tuple[Any, ...] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        self.aborted = (code, details, tuple(trailing))
        raise grpc.aio.AbortError()


async def test_abort_for_exception_logs_tracebacks_only_for_internal(caplog: pytest.LogCaptureFixture) -> None:
    context = _RecordingContext()
    with caplog.at_level(logging.INFO, logger="protoserve.server.errors"):
        with pytest.raises(grpc.aio.AbortError):
            await abort_for_exception(context, ZeroDivisionError("boom"), "req-7")  # type: ignore[arg-type]
    assert context.aborted == (Code.INTERNAL, "internal error (request id req-7)", ())
    assert any(record.exc_info and "req-7" in record.getMessage() for record in caplog.records)


async def test_rpc_errors_passes_cancellation_and_aborts_through() -> None:
    context = _RecordingContext()
    with pytest.raises(asyncio.CancelledError):
        async with rpc_errors(context, "r"):  # type: ignore[arg-type]
            raise asyncio.CancelledError()
    assert context.aborted is None
    with pytest.raises(grpc.aio.AbortError):
        async with rpc_errors(context, lambda: "late-id"):  # type: ignore[arg-type]
            raise InvalidRequestError("bad n")
    assert context.aborted == (Code.INVALID_ARGUMENT, "bad n", ())


async def test_overload_reaches_the_client_with_retry_after() -> None:
    engine = FakeEngine(error=EngineOverloadedError(257, 256, retry_after_s=2.0))
    async with running_server([generation_model("tiny", engine)], warm_up=False) as running:
        from protoserve.v1 import generation_pb2, generation_pb2_grpc

        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            call = stub.Generate(generation_pb2.GenerateRequest(text="hi"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED
    assert "257 requests waiting" in (caught.value.details() or "")
    assert ("retry-after", "2") in tuple(caught.value.trailing_metadata() or ())


async def test_unexpected_engine_error_is_internal_with_request_id_only() -> None:
    engine = FakeEngine(error=RuntimeError("tensor at 0x7ffd1234 failed in /opt/protoserve/engine.py"))
    async with running_server([generation_model("tiny", engine)], warm_up=False) as running:
        from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            request = generation_pb2.GenerateRequest(text="hi", options=common_pb2.RequestOptions(request_id="abc"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Generate(request):
                    pass
    assert caught.value.code() == Code.INTERNAL
    assert caught.value.details() == "internal error (request id abc)"
