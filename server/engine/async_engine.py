"""The asyncio face of the engine: one engine thread, one asyncio queue per request.

Callers on the event loop hand requests and aborts to the engine thread through pending lists
guarded by a lock; the thread sleeps on a condition while there is no work, and otherwise runs
`LLMEngine.step()` and pushes each output into its request's queue with
`loop.call_soon_threadsafe`. A caller that fell behind gets the outputs waiting in its queue as
one merged output (output_merging.py), so its lag does not grow with every step. Cancelling or
closing a `generate()` iterator aborts the request (vLLM's AsyncLLM pattern).

A step that raises fails only the requests scheduled in it (`RequestFailedError`, blocks freed);
after `MAX_CONSECUTIVE_STEP_FAILURES` failing steps in a row the engine is dead: every request
gets `EngineDeadError`, `stats().alive` is False, and new calls raise `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from protoserve.server.engine import compute_threads
from protoserve.server.engine.api import EngineConfig, EngineRequest, EngineStats, FinishReason, RequestOutput
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.errors import EngineDeadError, EngineError, InvalidRequestError, RequestFailedError
from protoserve.server.engine.loader import LoadedModel
from protoserve.server.engine.output_merging import merge_outputs

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass(eq=False)
class _Stream:
    """Where one request's outputs (or its error) go, on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)

    def deliver(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


def _put_all(deliveries: list[tuple[_Stream, RequestOutput]]) -> None:
    """On the callers' loop: each output into its request's queue."""
    for stream, output in deliveries:
        stream.queue.put_nowait(output)


class AsyncEngine:
    """Implements `GenerationEngine` over an `LLMEngine` run by one background thread."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, **engine_options: Any) -> None:
        self._engine = LLMEngine(loaded, config, **engine_options)
        self._condition = threading.Condition()
        self._pending_adds: list[tuple[EngineRequest, _Stream]] = []
        self._pending_aborts: list[tuple[str, FinishReason]] = []
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._alive = True
        self._stats = self._engine.stats()
        self._thread = threading.Thread(target=self._run, name="protoserve-engine", daemon=True)
        self._thread.start()

    # ----- GenerationEngine -----

    @property
    def context_length(self) -> int:
        return self._engine.context_length

    @property
    def engine(self) -> LLMEngine:
        """The synchronous engine (owned by the engine thread: read only, for tests and metrics)."""
        return self._engine

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        stream = _Stream(asyncio.get_running_loop())
        with self._condition:
            if not self._alive or self._stopping:
                raise EngineDeadError("the engine is not running; no new requests are accepted")
            if request.request_id in self._streams:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            self._streams[request.request_id] = stream
            self._pending_adds.append((request, stream))
            self._condition.notify()
        try:
            held: BaseException | None = None  # an error taken from the queue behind outputs, raised next
            while True:
                item = held if held is not None else await stream.queue.get()
                held = None
                if isinstance(item, BaseException):
                    raise item
                # Outputs that queued up while the caller was busy go out as one (output_merging).
                queued = [item]
                while not queued[-1].finished and not stream.queue.empty():
                    following = stream.queue.get_nowait()
                    if isinstance(following, BaseException):
                        held = following
                        break
                    queued.append(following)
                item = merge_outputs(queued)
                yield item
                if item.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.abort(request.request_id)
            raise
        finally:
            with self._condition:
                if self._streams.get(request.request_id) is stream:
                    del self._streams[request.request_id]

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        with self._condition:
            self._pending_aborts.append((request_id, reason))
            self._condition.notify()

    def stats(self) -> EngineStats:
        """The counts the engine thread published after its last step, with `alive` and
        `pending_requests` (requests accepted but not yet admitted to the scheduler) read live."""
        with self._condition:
            snapshot = self._stats
            alive = self._alive
            pending = len(self._pending_adds)
        return EngineStats(**{**snapshot.__dict__, "alive": alive, "pending_requests": pending})

    async def shutdown(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        await asyncio.to_thread(self._thread.join)

    def inject_step_fault(self, fault: Callable[[], None] | None) -> None:
        """Test-only: call `fault` after scheduling each step; if it raises, that step fails."""
        self._engine.step_fault_hook = fault

    # ----- the engine thread -----

    def _has_work(self) -> bool:
        return bool(
            self._pending_adds or self._pending_aborts or self._stopping or self._engine.has_unfinished_requests
        )

    def _run(self) -> None:
        compute_threads.enter()
        try:
            self._loop()
        except BaseException:  # a bug in the loop itself: never leave callers waiting forever
            logger.exception("the engine loop crashed")
            self._die()

    def _loop(self) -> None:
        consecutive_failures = 0
        while True:
            with self._condition:
                while not self._has_work():
                    self._condition.wait()
                adds, self._pending_adds = self._pending_adds, []
                aborts, self._pending_aborts = self._pending_aborts, []
                stopping = self._stopping
            self._admit(adds)
            for request_id, reason in aborts:
                self._deliver_output(self._engine.abort(request_id, reason))
            if stopping:
                for request_id in list(self._engine.requests):
                    self._deliver_output(self._engine.abort(request_id))
                self._publish_stats()
                return
            if self._engine.has_unfinished_requests:
                if self._step():
                    consecutive_failures = 0
                    continue  # the step published the stats
                consecutive_failures += 1
                if consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                    logger.error("%d engine steps failed in a row", consecutive_failures)
                    self._die()
                    return
                continue
            self._publish_stats()

    def _admit(self, adds: list[tuple[EngineRequest, _Stream]]) -> None:
        for request, stream in adds:
            try:
                self._engine.add_request(request)
            except EngineError as error:
                stream.deliver(error)
            except Exception as error:  # a bug or a model failure while preparing the request
                logger.exception("admitting request %s failed", request.request_id)
                stream.deliver(RequestFailedError(f"the request could not be prepared ({type(error).__name__})"))

    def _step(self) -> bool:
        """One engine step. The stats are published before the step's outputs (or errors) go out, so a
        caller that got its request's last output sees that request's KV blocks freed."""
        try:
            outputs = self._engine.step()
        except Exception as error:
            logger.exception("engine step %d failed", self._engine.steps)
            failed = self._engine.fail_requests(self._engine.last_step_request_ids)
            self._publish_stats()
            for request_id in failed:
                self._deliver_error(
                    request_id,
                    RequestFailedError(f"the engine failed while running this request ({type(error).__name__})"),
                )
            return False
        self._publish_stats()
        self._deliver_step_outputs(outputs)
        return True

    def _die(self) -> None:
        logger.error("the engine is dead; failing every request")
        with self._condition:
            self._alive = False
            self._pending_adds = []
            streams = list(self._streams.values())
        for stream in streams:
            stream.deliver(EngineDeadError("the engine stopped after repeated failures"))
        try:
            self._engine.fail_requests(list(self._engine.requests))
            self._publish_stats()
        except Exception:
            logger.exception("cleaning up after the engine died failed")

    def _deliver_output(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        with self._condition:
            stream = self._streams.get(output.request_id)
        if stream is not None:
            stream.deliver(output)

    def _deliver_step_outputs(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, with one wake-up per event loop instead of one per output (each
        `call_soon_threadsafe` writes to the loop's self-pipe). Per request the order is kept: a
        loop runs its callbacks in the order they were scheduled."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._condition:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # the callers' loop is closed: nobody is listening any more
                pass

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        with self._condition:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.deliver(error)

    def _publish_stats(self) -> None:
        snapshot = self._engine.stats()
        with self._condition:
            self._stats = snapshot
