"""Routing folders to the right loader, describing models, and loading off the event loop."""

from __future__ import annotations

import gc
import json
import sys
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.engine.errors import ModelLoadError
from protoserve.server.model_loading import (
    TransformersModelLoader,
    describe_generation_model,
    describe_speech_model,
    is_whisper_folder,
    resolve_model_folder,
    run_in_daemon_thread,
    silent_wav,
)
from protoserve.server.registry import ServedSpeechModel


def _folder(tmp_path: Path, name: str, config: object) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_whisper_folders_are_recognised(tmp_path: Path) -> None:
    assert is_whisper_folder(_folder(tmp_path, "w", {"model_type": "whisper"}))
    assert not is_whisper_folder(_folder(tmp_path, "l", {"model_type": "llama"}))
    assert not is_whisper_folder(_folder(tmp_path, "bad", ["not", "a", "dict"]))
    assert not is_whisper_folder(tmp_path / "missing")


def test_resolution_is_local_only(tmp_path: Path) -> None:
    assert resolve_model_folder(str(tmp_path)) == tmp_path
    assert resolve_model_folder(str(tmp_path / "absent")) is None
    assert resolve_model_folder("no-such-org/no-such-model") is None  # HF_HUB_OFFLINE, empty cache entry
    assert TransformersModelLoader(ServerConfig()).resolve("../../not/a/model") is None


async def test_speech_folders_go_to_the_speech_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path, "whisper-tiny", {"model_type": "whisper"})
    calls: list[tuple[str, str, str, str]] = []
    fake = SimpleNamespace(
        created=1, context_length=448, architecture="WhisperForConditionalGeneration", dtype="float32", device="cpu"
    )

    def load_speech_model(path: str, *, dtype: str, device: str) -> SimpleNamespace:
        calls.append((path, dtype, device, threading.current_thread().name))
        return fake

    # A stand-in module: the real one imports torch, which this routing test does not need.
    fake_module = SimpleNamespace(load_speech_model=load_speech_model)
    monkeypatch.setitem(sys.modules, "protoserve.server.transcription.speech_model", fake_module)
    loader = TransformersModelLoader(ServerConfig(dtype="float32", device="cpu"))
    served = await loader.load(ModelSpec("stt", str(folder)))
    assert isinstance(served, ServedSpeechModel) and served.model is fake
    assert served.description.capabilities == ("transcribe",) and served.description.modalities == ("audio",)
    assert calls[0][:3] == (str(folder), "float32", "cpu")
    assert calls[0][3].startswith("protoserve-load-")
    with pytest.raises(ModelLoadError, match="'gone': .* is not a folder here"):
        await loader.load(ModelSpec("gone", str(tmp_path / "gone")))


async def test_daemon_thread_delivers_results_and_errors() -> None:
    assert await run_in_daemon_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await run_in_daemon_thread(lambda: 1 / 0)


class _HalfLoadedModel:
    """Stands for weights a load had in hand when it failed."""


async def test_a_failed_load_does_not_keep_what_it_had_loaded() -> None:
    """The error's traceback held the failed load's frames and a half-loaded model with them (GPU
    memory too) until a garbage collection ran; their locals are dropped, so it is freed at once."""
    loaded: list[weakref.ref[_HalfLoadedModel]] = []

    def load_then_fail() -> None:
        model = _HalfLoadedModel()
        loaded.append(weakref.ref(model))
        raise ValueError("the tokenizer could not be loaded")

    gc.disable()  # freed by reference counting alone, not by a collection
    try:
        with pytest.raises(ValueError, match="tokenizer") as raised:
            await run_in_daemon_thread(load_then_fail)
        assert loaded[0]() is None
        assert raised.value.__traceback__ is not None  # where it failed is still known
    finally:
        gc.enable()


def test_descriptions() -> None:
    loaded = SimpleNamespace(
        tokenizer=SimpleNamespace(chat_template=None),
        processor=SimpleNamespace(chat_template="{{x}}"),
        created=5,
        modalities=("text", "image"),
        context_length=4096,
        quantization="bnb-4bit",
        architecture="LlavaForConditionalGeneration",
        dtype="bfloat16",
        device="cuda:0",
    )
    described = describe_generation_model("org/vlm", loaded)
    assert (described.owned_by, described.capabilities, described.modalities) == (
        "org",
        ("generate", "chat"),
        ("text", "image"),
    )
    loaded.processor = None
    assert describe_generation_model("/models/base", loaded).capabilities == ("generate",)
    assert describe_generation_model("/models/base", loaded).owned_by == "protoserve"
    speech = SimpleNamespace(created=1, context_length=448, architecture="W", dtype="float16", device="cpu")
    assert describe_speech_model("whisper", speech).quantization == "none"


def test_silent_wav_is_a_wav_file() -> None:
    data = silent_wav(0.5)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) == 44 + 16_000
