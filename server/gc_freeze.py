"""Keep Python's cycle collector off the loaded models.

A loaded model is a few hundred thousand long-lived Python objects (modules, parameters, the
tokenizer's vocabulary): SmolLM2-135M with its tokenizer makes about 380,000. Every full
collection walks all of them, about 165 ms on this project's 2-core machine, holding the GIL the
whole time, so the engine thread and the event loop both stand still; a server streaming tokens
allocates enough to trigger one every so often, and each shows up as a stalled token in every
stream.

Once the startup models are loaded and warmed, the server calls `freeze_long_lived()`: everything
alive moves into the permanent generation, which the collector skips (a full collection then
takes well under a millisecond); reference counting still frees frozen objects. Before a model is
released, `thaw_for_release()` hands everything back to the collector, so that reference cycles
inside the unloaded model can be collected, and freezes again a moment later, once the caller has
dropped its last reference. `refreeze()` takes a model loaded on demand into the frozen set.
Processes that never call `freeze_long_lived()` (tests) are left alone by the other two.
"""

from __future__ import annotations

import asyncio
import gc
import logging

logger = logging.getLogger(__name__)

# Seconds between a release and freezing again: the releasing coroutine has returned by then.
REFREEZE_DELAY_S = 1.0

_enabled = False  # this process keeps its long-lived objects frozen
_pending_refreeze: asyncio.TimerHandle | None = None


def freeze_long_lived() -> int:
    """Collect garbage, then freeze every object still alive; returns how many are frozen."""
    global _enabled
    _enabled = True
    _cancel_pending_refreeze()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("froze %d long-lived objects", frozen)
    return frozen


def thaw_for_release() -> None:
    """Before a model is released (inside the event loop): unfreeze, and freeze again after
    REFREEZE_DELAY_S. Nothing happens in a process that never froze."""
    global _pending_refreeze
    if not _enabled:
        return
    gc.unfreeze()
    if _pending_refreeze is None:
        _pending_refreeze = asyncio.get_running_loop().call_later(REFREEZE_DELAY_S, _refreeze_if_enabled)


def _refreeze_if_enabled() -> None:
    global _pending_refreeze
    _pending_refreeze = None
    if _enabled:
        freeze_long_lived()


def _cancel_pending_refreeze() -> None:
    global _pending_refreeze
    if _pending_refreeze is not None:
        _pending_refreeze.cancel()
        _pending_refreeze = None


def refreeze() -> None:
    """After a model was loaded on demand: freeze it too (in a process that freezes). While a
    release's refreeze is pending, that one freezes the new model too, once the released one is
    gone (freezing now would freeze the released model's cycles with it)."""
    if _enabled and _pending_refreeze is None:
        freeze_long_lived()


def stop_freezing() -> None:
    """Unfreeze everything and stop freezing (tests, and a server that shuts down)."""
    global _enabled
    _enabled = False
    _cancel_pending_refreeze()
    gc.unfreeze()
