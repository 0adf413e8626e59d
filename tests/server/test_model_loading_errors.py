"""Loading failures reach the caller as INVALID_ARGUMENT with the reason, and speech models get the
flags that apply to them: --gguf-file is refused, the server-wide --quantization is not applied and
says so in the log."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import grpc.aio
import pytest
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.engine.errors import ModelLoadError
from protoserve.server.model_loading import TransformersModelLoader
from protoserve.server.registry import ModelRegistry
from protoserve.v1 import models_pb2, models_pb2_grpc

from .runtime_fakes import running_server, target


@pytest.fixture(scope="module")
def truncated_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama folder whose safetensors were cut off halfway, as by an interrupted copy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / "cut-llama"
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


async def test_load_model_of_a_broken_folder_is_invalid_argument_with_the_reason(truncated_folder: Path) -> None:
    config = ServerConfig(port=0, enable_on_demand_loading=True, warm_up=False)
    registry = ModelRegistry(loader=TransformersModelLoader(config), enable_on_demand_loading=True)
    async with running_server(registry=registry, enable_on_demand_loading=True, warm_up=False) as running:
        async with grpc.aio.insecure_channel(target(running)) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.LoadModel(models_pb2.LoadModelRequest(id=str(truncated_folder)))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could not be loaded (SafetensorError: " in (raised.value.details() or "")
            listed = await stub.ListModels(models_pb2.ListModelsRequest())
            assert [model.id for model in listed.models] == []


def whisper_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "whisper-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    return folder


@pytest.fixture
def fake_speech_loader(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Replace the speech loader (it imports torch) by one that records its arguments."""
    calls: list[tuple[str, str, str]] = []

    def load_speech_model(path: str, *, dtype: str, device: str) -> SimpleNamespace:
        calls.append((path, dtype, device))
        return SimpleNamespace(
            created=1, context_length=448, architecture="WhisperForConditionalGeneration", dtype=dtype, device=device
        )

    fake_module = SimpleNamespace(load_speech_model=load_speech_model)
    monkeypatch.setitem(sys.modules, "protoserve.server.transcription.speech_model", fake_module)
    return calls


async def test_a_whisper_folder_with_a_gguf_file_is_refused(
    tmp_path: Path, fake_speech_loader: list[tuple[str, str, str]]
) -> None:
    folder = whisper_folder(tmp_path)
    loader = TransformersModelLoader(ServerConfig(device="cpu"))
    with pytest.raises(ModelLoadError, match=r"'stt': .* is a whisper model.*--gguf-file model\.gguf applies only"):
        await loader.load(ModelSpec("stt", str(folder), gguf_file="model.gguf"))
    assert fake_speech_loader == []


async def test_server_wide_quantization_is_not_applied_to_speech_models_and_says_so(
    tmp_path: Path, fake_speech_loader: list[tuple[str, str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    # `serve --quantization 8bit --model chat --model whisper` must still start: quantization is one
    # flag for every model, so a whisper model is loaded unquantized, with a warning.
    folder = whisper_folder(tmp_path)
    loader = TransformersModelLoader(ServerConfig(device="cpu", dtype="float32", quantization="8bit"))
    with caplog.at_level(logging.WARNING, logger="protoserve.server.model_loading"):
        served = await loader.load(ModelSpec("stt", str(folder)))
    assert served.description.quantization == "none"
    assert fake_speech_loader == [(str(folder), "float32", "cpu")]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--quantization 8bit applies only to language models" in warnings[0]


async def test_speech_models_without_quantization_log_no_warning(
    tmp_path: Path, fake_speech_loader: list[tuple[str, str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    folder = whisper_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="protoserve.server.model_loading"):
        await TransformersModelLoader(ServerConfig(device="cpu")).load(ModelSpec("stt", str(folder)))
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []
