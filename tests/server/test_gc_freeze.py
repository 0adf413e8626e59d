"""gc_freeze: frozen objects survive collections, a released model's cycles do not, and the
server freezes again after a release and after an on-demand load."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from protoserve.server import gc_freeze
from protoserve.server.cli import serve
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.registry import ModelRegistry, ServedGenerationModel

from .runtime_fakes import FakeEngine, FakeSpeechModel, generation_model, speech_model


class Cyclic:
    """An object that only the cycle collector can free (it refers to itself)."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def unfrozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(gc_freeze, "REFREEZE_DELAY_S", 0.05)
    gc_freeze.stop_freezing()
    yield
    gc_freeze.stop_freezing()


def test_frozen_cycles_survive_a_full_collection_until_thawed() -> None:
    cyclic = Cyclic()
    alive = weakref.ref(cyclic)
    assert gc_freeze.freeze_long_lived() > 0
    del cyclic
    gc.collect()
    assert alive() is not None, "a frozen object is skipped by the collector"
    gc_freeze.stop_freezing()
    gc.collect()
    assert alive() is None and gc.get_freeze_count() == 0


async def test_thaw_for_release_frees_cycles_then_freezes_again() -> None:
    cyclic = Cyclic()
    alive = weakref.ref(cyclic)
    gc_freeze.freeze_long_lived()
    del cyclic
    gc_freeze.thaw_for_release()
    gc_freeze.thaw_for_release()  # a second release in the same window schedules nothing more
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None
    await asyncio.sleep(0.2)
    assert gc.get_freeze_count() > 0


async def test_a_load_during_a_release_waits_for_the_pending_refreeze() -> None:
    cyclic = Cyclic()
    alive = weakref.ref(cyclic)
    gc_freeze.freeze_long_lived()
    gc_freeze.thaw_for_release()
    gc_freeze.refreeze()  # a model loaded while the released one is still referenced
    assert gc.get_freeze_count() == 0
    del cyclic
    await asyncio.sleep(0.2)
    assert alive() is None and gc.get_freeze_count() > 0


async def test_stopping_cancels_a_pending_refreeze() -> None:
    gc_freeze.freeze_long_lived()
    gc_freeze.thaw_for_release()
    gc_freeze.stop_freezing()
    await asyncio.sleep(0.2)
    assert gc.get_freeze_count() == 0


async def test_a_process_that_never_froze_is_left_alone() -> None:
    gc_freeze.thaw_for_release()
    gc_freeze.refreeze()
    await asyncio.sleep(0.2)
    assert gc.get_freeze_count() == 0


class CyclicEngineLoader:
    """Loads a fake engine that sits in a reference cycle, and keeps only a weak reference to it."""

    def __init__(self) -> None:
        self.engine: weakref.ref[FakeEngine] | None = None

    def resolve(self, model_id: str) -> ModelSpec | None:
        return ModelSpec(model_id, model_id)

    async def load(self, spec: ModelSpec) -> ServedGenerationModel:
        engine = FakeEngine()
        engine.cycle = engine  # type: ignore[attr-defined]
        self.engine = weakref.ref(engine)
        return generation_model(spec.model_id, engine)


async def test_registry_freezes_on_demand_models_and_thaws_them_for_release(tmp_path: Path) -> None:
    now = [1000.0]
    loader = CyclicEngineLoader()
    registry = ModelRegistry(
        [generation_model("startup")],
        loader=loader,
        enable_on_demand_loading=True,
        idle_unload_seconds=60,
        clock=lambda: now[0],
    )
    gc_freeze.freeze_long_lived()
    gc.unfreeze()  # so that the count below shows the on-demand load froze again
    await registry.load(str(tmp_path))
    assert gc.get_freeze_count() > 0 and loader.engine is not None
    now[0] += 61
    assert await registry.unload_idle() == [str(tmp_path)]
    assert gc.get_freeze_count() == 0
    await asyncio.sleep(0.2)  # the refreeze collects first, once the release's last references are gone
    assert loader.engine() is None, "the released engine's cycle was collected"
    assert gc.get_freeze_count() > 0
    await registry.shutdown()


async def test_serve_freezes_once_started_and_unfreezes_on_exit(tmp_path: Path) -> None:
    socket_path = tmp_path / "serve.sock"
    config = ServerConfig(port=None, unix_socket=str(socket_path), drain_grace_seconds=1.0, warm_up=False)
    registry = ModelRegistry([speech_model("whisper", FakeSpeechModel(windows=1, window_delay=0.0))])
    serving = asyncio.ensure_future(serve(config, registry, freeze_long_lived_objects=True))
    while gc.get_freeze_count() == 0:
        assert not serving.done()
        await asyncio.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving, 10) == 0
    assert gc.get_freeze_count() == 0
