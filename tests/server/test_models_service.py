"""ModelService over the registry: list, describe, NOT_FOUND, on-demand loading on and off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from protoserve.server.config import ModelSpec
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.errors import ModelNotFoundError, NoDefaultModelError, ServerPermissionError
from protoserve.server.registry import ModelRegistry, ServedGenerationModel
from protoserve.v1 import models_pb2, models_pb2_grpc

from .runtime_fakes import FakeEngine, generation_model, running_server, speech_model, target


class CountingLoader:
    """Resolves ids that name an existing folder; each load takes a moment and is counted."""

    def __init__(self, engine: FakeEngine | None = None) -> None:
        self.loads: list[str] = []
        self.engine = engine

    def resolve(self, model_id: str) -> ModelSpec | None:
        return ModelSpec(model_id, model_id) if Path(model_id).is_dir() else None

    async def load(self, spec: ModelSpec) -> ServedGenerationModel:
        self.loads.append(spec.model_id)
        await asyncio.sleep(0.05)
        return generation_model(spec.model_id, self.engine or FakeEngine())


async def test_list_and_describe() -> None:
    async with running_server([generation_model("tiny"), speech_model("whisper")], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)
            listed = await stub.ListModels(models_pb2.ListModelsRequest())
            assert [model.id for model in listed.models] == ["tiny", "whisper"]
            info = await stub.GetModel(models_pb2.GetModelRequest(id="whisper"))
            assert list(info.modalities) == [models_pb2.MODALITY_AUDIO]
            assert list(info.capabilities) == ["transcribe"]
            assert info.loaded and info.architecture == "WhisperForConditionalGeneration"
            tiny = await stub.GetModel(models_pb2.GetModelRequest(id="tiny"))
            assert tiny.context_length == 2048 and list(tiny.capabilities) == ["generate", "chat"]
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetModel(models_pb2.GetModelRequest(id="gpt-9"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert "'tiny', 'whisper'" in (missing.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as empty:
                await stub.GetModel(models_pb2.GetModelRequest(id=""))
            assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_load_and_unload_are_denied_without_the_flag() -> None:
    async with running_server([generation_model("tiny")], warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)
            for call in (
                stub.LoadModel(models_pb2.LoadModelRequest(id="/tmp")),
                stub.LoadModel(models_pb2.LoadModelRequest(id="")),
                stub.UnloadModel(models_pb2.UnloadModelRequest(id="tiny")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await call
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "--enable-on-demand-loading" in (denied.value.details() or "")


async def test_on_demand_load_and_unload_over_grpc(tmp_path: Path) -> None:
    folder = tmp_path / "extra-model"
    folder.mkdir()
    loader = CountingLoader()
    registry = ModelRegistry([generation_model("tiny")], loader=loader, enable_on_demand_loading=True)
    async with running_server(registry=registry, warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)
            loaded = await stub.LoadModel(models_pb2.LoadModelRequest(id=str(folder)))
            assert loaded.id == str(folder) and loaded.loaded
            listed = await stub.ListModels(models_pb2.ListModelsRequest())
            assert [model.id for model in listed.models] == ["tiny", str(folder)]
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.LoadModel(models_pb2.LoadModelRequest(id=str(tmp_path / "absent")))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as startup:
                await stub.UnloadModel(models_pb2.UnloadModelRequest(id="tiny"))
            assert startup.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await stub.UnloadModel(models_pb2.UnloadModelRequest(id=str(folder)))).unloaded
            assert not (await stub.UnloadModel(models_pb2.UnloadModelRequest(id=str(folder)))).unloaded


async def test_concurrent_requests_load_a_model_once(tmp_path: Path) -> None:
    loader = CountingLoader()
    registry = ModelRegistry(loader=loader, enable_on_demand_loading=True)
    served = await asyncio.gather(*(registry.generation_model(str(tmp_path)) for _ in range(8)))
    assert loader.loads == [str(tmp_path)]
    assert len({id(model) for model in served}) == 1


async def test_defaults_kinds_and_unknown_ids() -> None:
    registry = ModelRegistry([speech_model("whisper"), generation_model("first"), generation_model("second")])
    assert (await registry.generation_model("")).description.id == "first"
    assert (await registry.speech_model("")).description.id == "whisper"
    assert (await registry.generation_model("second")).description.id == "second"
    with pytest.raises(InvalidRequestError, match="not a generation model"):
        await registry.generation_model("whisper")
    with pytest.raises(ModelNotFoundError, match="known models: 'whisper', 'first', 'second'"):
        await registry.generation_model("third")
    with pytest.raises(NoDefaultModelError, match="no default speech model"):
        await ModelRegistry([generation_model("x")]).speech_model("")
    with pytest.raises(ServerPermissionError):
        await registry.load("/tmp")
    assert registry.metrics_label("third") == "unknown"
    assert registry.metrics_label("", "speech") == "whisper"


async def test_idle_models_unload_but_never_while_in_use(tmp_path: Path) -> None:
    now = [1000.0]
    engine = FakeEngine()
    registry = ModelRegistry(
        [generation_model("startup")],
        loader=CountingLoader(engine),
        enable_on_demand_loading=True,
        idle_unload_seconds=60,
        clock=lambda: now[0],
    )
    model_id = str(tmp_path)
    await registry.load(model_id)
    now[0] += 61
    async with registry.lease(model_id):
        assert await registry.unload_idle() == []
    now[0] += 61
    engine.running = 1  # a request the engine is still running
    assert await registry.unload_idle() == []
    engine.running = 0
    assert await registry.unload_idle() == [model_id]
    assert engine.shut_down
    assert registry.ids() == ["startup"]
    await registry.shutdown()


class GatedShutdownEngine(FakeEngine):
    """An engine whose shutdown waits for `finish_shutdown` (a real one joins its thread, frees memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.shutting_down = asyncio.Event()
        self.finish_shutdown = asyncio.Event()

    async def shutdown(self) -> None:
        self.shutting_down.set()
        await self.finish_shutdown.wait()
        self.shut_down = True


class GatedLoader:
    """Loads any id with an engine of its own."""

    def __init__(self) -> None:
        self.engines: dict[str, GatedShutdownEngine] = {}

    def resolve(self, model_id: str) -> ModelSpec | None:
        return ModelSpec(model_id, model_id)

    async def load(self, spec: ModelSpec) -> ServedGenerationModel:
        engine = self.engines[spec.model_id] = GatedShutdownEngine()
        return generation_model(spec.model_id, engine)


async def test_the_idle_unloader_checks_each_model_again_before_unloading_it() -> None:
    """While one idle model's engine shuts down, another is leased by a request and a third is unloaded
    by UnloadModel: the leased one stays loaded, the unloaded one is not unloaded twice."""
    now = [1000.0]
    loader = GatedLoader()
    registry = ModelRegistry(loader=loader, enable_on_demand_loading=True, idle_unload_seconds=60, clock=lambda: now[0])
    for model_id in ("a", "b", "c"):
        await registry.load(model_id)
    loader.engines["b"].finish_shutdown.set()
    loader.engines["c"].finish_shutdown.set()
    now[0] += 61
    unloading = asyncio.create_task(registry.unload_idle())
    await loader.engines["a"].shutting_down.wait()
    await registry.generation_model("b")
    async with registry.lease("b"):
        assert await registry.unload("c")
        loader.engines["a"].finish_shutdown.set()
        assert await unloading == ["a"]
        assert not loader.engines["b"].shutting_down.is_set()
        assert registry.ids() == ["b"]
    now[0] += 61
    assert await registry.unload_idle() == ["b"]
    assert loader.engines["b"].shut_down and registry.ids() == []
    await registry.shutdown()
