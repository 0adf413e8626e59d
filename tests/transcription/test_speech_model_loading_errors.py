"""Broken whisper folders are ModelLoadErrors naming the part and the reason, never raw exceptions."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from protoserve.server.engine.errors import ModelLoadError
from protoserve.server.transcription.speech_model import load_speech_model
from safetensors.torch import load_file, save_file


def broken_copy(folder: Path, tmp_path: Path, change: Callable[[Path], None]) -> Path:
    copy = tmp_path / "broken-whisper"
    shutil.copytree(folder, copy)
    change(copy)
    return copy


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def drop_decoder_layers(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    kept = {key: tensor for key, tensor in tensors.items() if ".decoder.layers." not in key}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


def unreadable_tokenizer(folder: Path) -> None:
    for name in ("vocab.json", "tokenizer.json"):
        if (folder / name).exists():
            (folder / name).write_text("{cut off")


def no_feature_extractor(folder: Path) -> None:
    (folder / "preprocessor_config.json").unlink()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (truncate_weights, r"the weights of the whisper model in .* could not be loaded \(SafetensorError: "),
        (drop_decoder_layers, r"tensors are missing from the checkpoint \(model\.decoder\.layers\.0\."),
        (unreadable_tokenizer, r"the tokenizer of the whisper model in .* could not be loaded \("),
        (no_feature_extractor, r"the feature extractor of the whisper model in .* could not be loaded \(OSError"),
    ],
)
def test_broken_whisper_folders_are_load_errors(
    tiny_whisper_english: Path, tmp_path: Path, change: Callable[[Path], None], message: str
) -> None:
    folder = broken_copy(tiny_whisper_english, tmp_path, change)
    with pytest.raises(ModelLoadError, match=message):
        load_speech_model(folder, device="cpu")


def test_the_intact_folder_loads(tiny_whisper_english: Path) -> None:
    assert load_speech_model(tiny_whisper_english, device="cpu").architecture == "WhisperForConditionalGeneration"
