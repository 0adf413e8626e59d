"""Starting, draining and stopping: which calls the server takes, and what signals do.

`ServingGate` is the server's state (STARTING -> SERVING -> DRAINING) and its count of calls in
flight. `GateInterceptor` refuses every call but health and reflection with UNAVAILABLE unless the
gate is SERVING, and counts the calls it lets through, so a drain knows when in-flight work is done.
`install_signal_handlers` wires SIGTERM/SIGINT: the first signal starts a graceful drain, a second one
aborts at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
from protoserve.server.interceptors import Context, around_call, is_infrastructure_method, rejecting_handler

logger = logging.getLogger("protoserve.server.lifecycle")


class ServingState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


class ServingGate:
    """Whether new calls are taken, and how many taken calls are still running."""

    def __init__(self) -> None:
        self.state = ServingState.STARTING
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def open(self) -> None:
        if self.state is ServingState.STARTING:
            self.state = ServingState.SERVING

    def close(self) -> None:
        """Start draining: new calls are refused from now on."""
        self.state = ServingState.DRAINING

    def refusal_message(self) -> str | None:
        """Why a new call is refused now, or None when it is taken."""
        if self.state is ServingState.STARTING:
            return "the server is starting (models are loading); retry shortly"
        if self.state is ServingState.DRAINING:
            return "the server is shutting down and takes no new requests; retry on another replica"
        return None

    @asynccontextmanager
    async def track(self, request: Any, context: Context) -> AsyncIterator[None]:
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight, at most `timeout` seconds; True when idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(timeout, 0.0))
        except TimeoutError:
            return False
        return True


class GateInterceptor(grpc.aio.ServerInterceptor):
    """UNAVAILABLE for new calls unless the gate is SERVING; health and reflection always pass."""

    def __init__(self, gate: ServingGate) -> None:
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if is_infrastructure_method(handler_call_details.method):
            return handler
        refusal = self._gate.refusal_message()
        if refusal is not None:
            return rejecting_handler(handler, grpc.StatusCode.UNAVAILABLE, refusal)  # type: ignore[return-value]
        return around_call(handler, self._gate.track)  # type: ignore[return-value]


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop, on_first: Callable[[], None], on_second: Callable[[], None]
) -> Callable[[], None]:
    """Call `on_first` at the first SIGTERM/SIGINT and `on_second` at any later one.

    Returns a function that removes the handlers.
    """
    received = 0

    def handle(signal_number: int) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signal_number).name
        if received == 1:
            logger.info("received %s: draining (send it again to stop at once)", name)
            on_first()
        else:
            logger.warning("received %s again: stopping at once", name)
            on_second()

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, handle, signal_number)

    def remove() -> None:
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signal_number)

    return remove
