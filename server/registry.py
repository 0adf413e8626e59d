"""The models a server answers with: those given at startup, and on-demand ones when allowed.

Invariants the registry keeps:
- The default generation (speech) model is the first startup model of that kind, in `--model` order.
- A model is loaded at most once, however many requests ask for it at the same time.
- Only on-demand models are ever unloaded, and the idle unloader never unloads a model while a
  request holds a lease on it or its engine has running or waiting requests.
- Without on-demand loading, `load` and `unload` raise `ServerPermissionError` (PERMISSION_DENIED).

The registry is constructible from already-built served models (tests inject fake engines), or from
a `ServerConfig` with a loader that reads weights (`model_loading.TransformersModelLoader`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from protoserve.server import gc_freeze
from protoserve.server.engine.api import EngineStats, GenerationEngine
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.errors import ModelNotFoundError, NoDefaultModelError, ServerPermissionError
from protoserve.server.request_log import note_model

if TYPE_CHECKING:
    from protoserve.server.config import ModelSpec, ServerConfig

logger = logging.getLogger("protoserve.server.registry")


@dataclass(frozen=True)
class ModelDescription:
    """What ModelService reports about one model (mirrors the proto's ModelInfo)."""

    id: str
    owned_by: str
    created: int  # unix seconds
    modalities: tuple[str, ...]  # "text", "image", "audio"
    context_length: int
    quantization: str
    loaded: bool
    architecture: str
    dtype: str
    device: str
    capabilities: tuple[str, ...]  # "generate", "chat", "transcribe"


@dataclass(frozen=True)
class ServedGenerationModel:
    """A loaded language (or vision-language) model and the engine that runs it."""

    description: ModelDescription
    loaded: Any  # protoserve.server.engine.loader.LoadedModel: tokenizer, processor, eos ids, ...
    engine: GenerationEngine


@dataclass(frozen=True)
class ServedSpeechModel:
    """A loaded speech-to-text model (protoserve.server.transcription.speech_model.SpeechModel)."""

    description: ModelDescription
    model: Any


ServedModel = ServedGenerationModel | ServedSpeechModel


class ModelLoader(Protocol):
    """Turns a model entry into a served model; the registry decides when."""

    def resolve(self, model_id: str) -> ModelSpec | None:
        """Where an on-demand id's weights are (a local folder or the local hub cache), or None."""
        ...

    async def load(self, spec: ModelSpec) -> ServedModel:
        """Load the weights and start the engine. Blocking work runs off the event loop."""
        ...


class ModelRegistry:
    """Served models by id, with defaults, on-demand loading, leases and idle unloading."""

    def __init__(
        self,
        models: Sequence[ServedModel] = (),
        *,
        loader: ModelLoader | None = None,
        startup_specs: Sequence[ModelSpec] = (),
        enable_on_demand_loading: bool = False,
        idle_unload_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._models: dict[str, ServedModel] = {}
        self._startup_ids: list[str] = []
        self._loader = loader
        self._startup_specs = list(startup_specs)
        self._on_demand = enable_on_demand_loading
        self._idle_unload_seconds = idle_unload_seconds
        self._clock = clock
        self._loading: dict[str, asyncio.Future[ServedModel]] = {}
        self._leases: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._idle_task: asyncio.Task[None] | None = None
        for served in models:
            self._add(served, startup=True)

    @staticmethod
    def from_config(config: ServerConfig) -> ModelRegistry:
        """A registry that loads `config.models` in `load_startup_models()` with the transformers loader."""
        from protoserve.server.model_loading import TransformersModelLoader

        return ModelRegistry(
            loader=TransformersModelLoader(config),
            startup_specs=config.models,
            enable_on_demand_loading=config.enable_on_demand_loading,
            idle_unload_seconds=config.idle_unload_seconds,
        )

    def _add(self, served: ServedModel, *, startup: bool) -> None:
        model_id = served.description.id
        if model_id in self._models:
            raise ValueError(f"model id {model_id!r} is served twice")
        self._models[model_id] = served
        self._last_used[model_id] = self._clock()
        if startup:
            self._startup_ids.append(model_id)

    async def load_startup_models(self) -> None:
        """Load every `--model` entry, in order. A failure stops the startup with that error."""
        if self._startup_specs and self._loader is None:
            raise RuntimeError("startup models were given without a loader")
        for spec in self._startup_specs:
            if spec.model_id in self._models:
                continue
            logger.info("loading model %s from %s", spec.model_id, spec.path)
            started = time.monotonic()
            assert self._loader is not None
            self._add(await self._loader.load(spec), startup=True)
            logger.info("loaded model %s in %.1fs", spec.model_id, time.monotonic() - started)
        self._startup_specs = []

    def ids(self) -> list[str]:
        return list(self._models)

    def served_models(self) -> list[ServedModel]:
        """Startup models first (in `--model` order), then on-demand ones in load order."""
        return list(self._models.values())

    @property
    def on_demand_enabled(self) -> bool:
        return self._on_demand

    def _default_id(self, kind: type) -> str | None:
        for model_id in self._startup_ids:
            if isinstance(self._models.get(model_id), kind):
                return model_id
        return None

    def metrics_label(self, model_id: str, kind: str = "generation") -> str:
        """A bounded label for metrics: a known id, the default model's id for '', else "unknown"
        (ids sent by callers must not create unbounded label values)."""
        if not model_id:
            kind_type = ServedSpeechModel if kind == "speech" else ServedGenerationModel
            return self._default_id(kind_type) or "unknown"
        return model_id if model_id in self._models else "unknown"

    async def _get(self, model_id: str, kind: type, kind_name: str) -> Any:
        if not model_id:
            default_id = self._default_id(kind)
            if default_id is None:
                raise NoDefaultModelError(kind_name, self.ids())
            model_id = default_id
        served = self._models.get(model_id)
        if served is None:
            if not self._on_demand:
                raise ModelNotFoundError(model_id, self.ids())
            served = await self._load_once(model_id)
        if not isinstance(served, kind):
            other = "TranscriptionService" if isinstance(served, ServedSpeechModel) else "GenerationService"
            raise InvalidRequestError(f"model {model_id!r} is not a {kind_name} model; call {other} with it")
        self._last_used[model_id] = self._clock()
        note_model(model_id)
        return served

    async def generation_model(self, model_id: str) -> ServedGenerationModel:
        """The generation model `model_id` ('' = the default one). Unknown ids raise ModelNotFoundError
        (or are loaded, with on-demand loading on)."""
        served: ServedGenerationModel = await self._get(model_id, ServedGenerationModel, "generation")
        return served

    async def speech_model(self, model_id: str) -> ServedSpeechModel:
        """The speech model `model_id` ('' = the default one)."""
        served: ServedSpeechModel = await self._get(model_id, ServedSpeechModel, "speech")
        return served

    def describe(self, model_id: str) -> ModelDescription:
        served = self._models.get(model_id)
        if served is None:
            raise ModelNotFoundError(model_id, self.ids())
        return served.description

    @asynccontextmanager
    async def lease(self, model_id: str) -> AsyncIterator[None]:
        """Hold `model_id` in memory for the block: the idle unloader skips leased models."""
        self._leases[model_id] = self._leases.get(model_id, 0) + 1
        try:
            yield
        finally:
            self._leases[model_id] -= 1
            self._last_used[model_id] = self._clock()

    def engine_stats(self) -> dict[str, EngineStats]:
        """Each generation model's engine snapshot, by model id."""
        return {
            model_id: served.engine.stats()
            for model_id, served in list(self._models.items())
            if isinstance(served, ServedGenerationModel)
        }

    # On-demand loading.

    def check_on_demand_allowed(self, action: str) -> None:
        """Raise ServerPermissionError unless on-demand loading is enabled. `action`: "loading", ..."""
        if not self._on_demand:
            raise ServerPermissionError(
                f"{action} models on demand is disabled; start the server with --enable-on-demand-loading"
            )

    async def load(self, model_id: str) -> ModelDescription:
        """Load a model on demand (a local folder or a hub id in the local cache)."""
        self.check_on_demand_allowed("loading")
        if not model_id.strip():
            raise InvalidRequestError("id is empty: give a local folder or a hub id from the local cache")
        served = self._models.get(model_id) or await self._load_once(model_id)
        return served.description

    async def _load_once(self, model_id: str) -> ServedModel:
        pending = self._loading.get(model_id)
        if pending is None:
            if self._loader is None:
                raise ModelNotFoundError(model_id, self.ids())
            spec = self._loader.resolve(model_id)
            if spec is None:
                raise ModelNotFoundError(model_id, self.ids())
            pending = asyncio.ensure_future(self._load_on_demand(spec))
            self._loading[model_id] = pending
            pending.add_done_callback(lambda _: self._loading.pop(model_id, None))
        # shield: a caller that gives up (cancel, deadline) does not cancel the load others wait for.
        return await asyncio.shield(pending)

    async def _load_on_demand(self, spec: ModelSpec) -> ServedModel:
        assert self._loader is not None
        logger.info("loading model %s on demand from %s", spec.model_id, spec.path)
        served = await self._loader.load(spec)
        self._add(served, startup=False)
        gc_freeze.refreeze()
        self._ensure_idle_unloader()
        return served

    async def unload(self, model_id: str) -> bool:
        """Unload an on-demand model; False if it is not loaded. Startup models stay."""
        self.check_on_demand_allowed("unloading")
        if model_id in self._startup_ids:
            raise ServerPermissionError(f"model {model_id!r} was loaded at startup and cannot be unloaded")
        served = self._models.pop(model_id, None)
        if served is None:
            return False
        self._last_used.pop(model_id, None)
        await _release(served)
        logger.info("unloaded model %s", model_id)
        return True

    def _is_idle(self, model_id: str, served: ServedModel, now: float) -> bool:
        assert self._idle_unload_seconds is not None
        if self._leases.get(model_id, 0) > 0:
            return False
        if now - self._last_used.get(model_id, now) < self._idle_unload_seconds:
            return False
        if isinstance(served, ServedGenerationModel):
            stats = served.engine.stats()
            if stats.running_requests or stats.waiting_requests:
                return False
        return True

    async def unload_idle(self) -> list[str]:
        """Unload on-demand models idle for `idle_unload_seconds`; returns their ids.

        Releasing a model awaits its engine's shutdown, during which requests may lease (or an
        UnloadModel call may unload) the other candidates. So each one is checked again just before it
        is removed, with no await between that check and the removal.
        """
        if self._idle_unload_seconds is None:
            return []
        now = self._clock()
        candidates = [
            model_id
            for model_id, served in list(self._models.items())
            if model_id not in self._startup_ids and self._is_idle(model_id, served, now)
        ]
        unloaded = []
        for model_id in candidates:
            served = self._models.get(model_id)
            if served is None or not self._is_idle(model_id, served, self._clock()):
                continue  # unloaded, or in use again, while an earlier candidate was being released
            self._models.pop(model_id, None)
            self._last_used.pop(model_id, None)
            unloaded.append(model_id)
            await _release(served)
            logger.info("unloaded model %s after %.0fs idle", model_id, self._idle_unload_seconds)
        return unloaded

    def _ensure_idle_unloader(self) -> None:
        if self._idle_unload_seconds is None or self._idle_task is not None:
            return
        interval = min(max(self._idle_unload_seconds / 4, 0.05), 10.0)

        async def unload_idle_forever() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.unload_idle()
                except Exception:
                    logger.exception("idle unloading failed")

        self._idle_task = asyncio.get_running_loop().create_task(unload_idle_forever())

    async def shutdown(self) -> None:
        """Stop the idle unloader and every engine; the registry is empty afterwards."""
        if self._idle_task is not None:
            self._idle_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._idle_task
            self._idle_task = None
        while self._models:
            # Removed before its release is awaited, so a concurrent unload never releases it twice.
            model_id = next(iter(self._models))
            served = self._models.pop(model_id)
            self._last_used.pop(model_id, None)
            await _release(served)

    def list(self) -> list[ModelDescription]:  # noqa: A003 - the name the ModelService speaks
        """Every loaded model's description: startup models first, then on-demand ones."""
        return [served.description for served in self._models.values()]


async def _release(served: ServedModel) -> None:
    gc_freeze.thaw_for_release()  # the model's reference cycles must be collectable once it is dropped
    try:
        if isinstance(served, ServedGenerationModel):
            await served.engine.shutdown()
        else:
            close = getattr(served.model, "close", None)
            if callable(close):
                close()
    except Exception:
        logger.exception("shutting down model %s failed", served.description.id)
