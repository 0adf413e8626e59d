"""Plumbing shared by the server's interceptors: wrapping or replacing a method handler's behavior.

A grpc.aio interceptor returns a method handler; these helpers build one of the same shape (unary
or streaming request and response, same (de)serializers) around the real one, so an interceptor can
run code around every call (`around_call`) or refuse a call before it reaches a servicer
(`rejecting_handler`). Response-streaming behaviors written as async generators stay async
generators, so the wrapped call streams exactly as the original.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import grpc
import grpc.aio

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
CallScope = Callable[[Any, Context], AbstractAsyncContextManager[None]]

_BEHAVIOR_FIELDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_METHOD_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_infrastructure_method(method: str) -> bool:
    """Health checks and reflection: open without an API key and answered while draining."""
    return method.startswith(HEALTH_METHOD_PREFIX) or method.startswith(REFLECTION_METHOD_PREFIXES)


def _behavior_field(handler: grpc.RpcMethodHandler) -> str:
    for name in _BEHAVIOR_FIELDS:
        if getattr(handler, name) is not None:
            return name
    raise ValueError("a method handler without a behavior")


def _wrap(original: Callable[..., Any], response_streaming: bool, scope: CallScope) -> Callable[..., Any]:
    if response_streaming and inspect.isasyncgenfunction(original):

        async def streaming_behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            async with scope(request, context):
                async for message in original(request, context):
                    yield message

        return streaming_behavior

    async def behavior(request: Any, context: Context) -> Any:
        async with scope(request, context):
            result = original(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result

    return behavior


def around_call(handler: grpc.RpcMethodHandler | None, scope: CallScope) -> grpc.RpcMethodHandler | None:
    """The same handler with its behavior run inside `scope(request, context)`."""
    if handler is None:
        return None
    field = _behavior_field(handler)
    wrapped = _wrap(getattr(handler, field), handler.response_streaming, scope)
    return handler._replace(**{field: wrapped})  # type: ignore[attr-defined]


def rejecting_handler(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler | None:
    """A handler of the same shape that ends every call at once with `code` and `message`."""
    if handler is None:
        return None
    field = _behavior_field(handler)

    if handler.response_streaming:

        async def reject_streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            await context.abort(code, message)
            yield  # pragma: no cover - abort always raises; this line makes the function a generator

        return handler._replace(**{field: reject_streaming})  # type: ignore[attr-defined]

    async def reject(request: Any, context: Context) -> Any:
        await context.abort(code, message)

    return handler._replace(**{field: reject})  # type: ignore[attr-defined]
