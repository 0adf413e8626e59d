"""Which threads of a server process run torch's CPU math, and with how many OpenMP threads.

torch's CPU builds use GNU OpenMP, which keeps one pool of worker threads for every thread that
has started a parallel region, for as long as that thread lives. Once the pools of a process
hold more threads than there are CPUs, every pool stops spinning between regions and puts its
workers to sleep after each one. A decode step runs a few hundred small parallel matrix
products, and waking the workers for each is expensive: on a 2-core AMD EPYC with SmolLM2-135M,
the step's matrix products took 25 ms instead of 20 ms, and a one-stream decode step 53 ms
instead of 46 ms, as soon as the server's main (asyncio) thread had run a single parallel op,
which loading a model does.

So the server calls `reserve(threads)` once, in its main thread, before any torch math: that
thread, and threads started after it unless they say otherwise, run torch on one OpenMP thread
(no pool), and the count is kept for the compute threads. Each compute thread (an engine's loop,
a speech model's worker) calls `enter()` when it starts and runs with that count; only those
threads own pools. Without a `reserve` (tests, in-process benchmarks) `enter()` changes nothing.
"""

from __future__ import annotations

import logging
from contextlib import suppress

import torch

logger = logging.getLogger(__name__)

_compute_threads: int | None = None


def reserve(threads: int | None) -> int:
    """Keep `threads` intra-op threads (None: torch's default, one per core) for the compute
    threads, and set the calling thread to one. Inter-op threads go to 1: the engine runs one
    forward at a time, so a second pool only competes. Returns the count kept."""
    global _compute_threads
    count = threads if threads is not None else torch.get_num_threads()
    if count < 1:
        raise ValueError(f"torch threads must be 1 or more, got {count}")
    with suppress(RuntimeError):  # torch refuses once inter-op work has started; then it stays as is
        torch.set_num_interop_threads(1)
    torch.set_num_threads(1)
    _compute_threads = count
    logger.info("torch CPU threads for the models' math: %d", count)
    return count


def reserved() -> int | None:
    """The count kept by `reserve`, or None when nothing was reserved in this process."""
    return _compute_threads


def enter() -> None:
    """Run the calling thread's torch math on the reserved number of threads (if any)."""
    if _compute_threads is not None and torch.get_num_threads() != _compute_threads:
        torch.set_num_threads(_compute_threads)


def release() -> None:
    """Forget the reservation (tests): `enter()` changes nothing again."""
    global _compute_threads
    _compute_threads = None
