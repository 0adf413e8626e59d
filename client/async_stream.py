"""`AsyncStream`: a server-streaming call of the async client, as an async iterator of results.

Both `async for item in client.chat(..., stream=True)` and `async for item in await client.chat(...,
stream=True)` work: awaiting the stream gives the stream itself. Leaving early should `aclose()` it
(or use `async with`), which cancels the call so that the server frees its work; a cancelled
consumer task cancels the call too. A call cancelled from elsewhere (`cancel()` from another task,
the client closed) ends the reader with `Cancelled`, not with asyncio's CancelledError.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Generator, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from protoserve.client.errors import Cancelled, error_from_rpc

Item = TypeVar("Item")


def this_task_is_being_cancelled() -> bool:
    """Asked in `except asyncio.CancelledError` around a grpc.aio call. grpc.aio raises CancelledError
    both when the awaiting task is cancelled (True: re-raise, so the cancellation goes on) and when
    the call itself was cancelled from elsewhere, by `cancel()` or by closing the client (False:
    raise `call_cancelled_elsewhere()`, an error like any other failed call, as the sync client does)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def call_cancelled_elsewhere() -> Cancelled:
    return Cancelled("the call was cancelled (by cancel() from elsewhere, or the client was closed)")


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
                if this_task_is_being_cancelled():
                    raise
                raise call_cancelled_elsewhere() from None
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
