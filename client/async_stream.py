"""`AsyncStream`: a server-streaming call of the async client, as an async iterator of results.

Both `async for item in client.chat(..., stream=True)` and `async for item in await client.chat(...,
stream=True)` work: awaiting the stream gives the stream itself. Leaving early should `aclose()` it
(or use `async with`), which cancels the call so that the server frees its work; a cancelled
consumer task cancels the call too.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Generator, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from protoserve.client.errors import error_from_rpc

Item = TypeVar("Item")


class AsyncStream(Generic[Item]):
    """Reads a grpc.aio stream call and converts each message into zero or more items."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, convert: Callable[[Any], Iterable[Item]]) -> None:
        self._call = call
        self._convert = convert
        self._pending: deque[Item] = deque()

    def __aiter__(self) -> AsyncStream[Item]:
        return self

    async def __anext__(self) -> Item:
        while not self._pending:
            try:
                message = await self._call.read()
            except grpc.RpcError as error:
                raise error_from_rpc(error) from None
            except asyncio.CancelledError:
                self._call.cancel()
                raise
            if message is grpc.aio.EOF:
                raise StopAsyncIteration
            self._pending.extend(self._convert(message))
        return self._pending.popleft()

    def __await__(self) -> Generator[Any, None, AsyncStream[Item]]:
        yield from ()
        return self

    def cancel(self) -> None:
        """Stop the call; the server aborts the request. Harmless once the stream has ended."""
        self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncStream[Item]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cancel()
