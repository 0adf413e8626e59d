"""The optional multilingual whisper base folder (a separate ~145 MB download, not part of fetch-demo).

Marked slow (whisper base decodes a 30 s window several times: about a minute on 2 busy cores), so it
runs with `make soak`, and only where the folder is already built: `fetch_multilingual_speech_model()`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
from protoserve.server.demo_models import DemoModels
from protoserve.server.demo_models.atomic_folder import is_built
from protoserve.server.demo_models.multilingual_speech import MULTILINGUAL_SPEECH_RECIPE
from transformers import WhisperForConditionalGeneration, WhisperProcessor


@pytest.fixture(scope="module")
def multilingual_folder(demo_models: DemoModels) -> Path:
    folder = demo_models.chat.parent / MULTILINGUAL_SPEECH_RECIPE.folder_name
    if not is_built(folder, MULTILINGUAL_SPEECH_RECIPE.identity):
        pytest.skip("multilingual whisper base not built; run fetch_multilingual_speech_model() to test it")
    return folder


@pytest.fixture(scope="module")
def spoken_english(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox must be on the PATH (make system-deps)")
    folder = tmp_path_factory.mktemp("multilingual")
    subprocess.run(
        ["espeak-ng", "-w", str(folder / "a.wav"), "The quick brown fox jumps over the lazy dog."],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["sox", str(folder / "a.wav"), "-r", "16000", str(folder / "b.wav")], check=True, capture_output=True
    )
    audio, _ = soundfile.read(folder / "b.wav", dtype="float32")
    return audio


@pytest.mark.slow
def test_detects_english_transcribes_and_translates(multilingual_folder: Path, spoken_english: np.ndarray) -> None:
    model = WhisperForConditionalGeneration.from_pretrained(multilingual_folder)
    processor = WhisperProcessor.from_pretrained(multilingual_folder)
    assert model.config.vocab_size == len(processor.tokenizer) == 51865
    generation = model.generation_config
    assert generation.is_multilingual and generation.no_timestamps_token_id == 50363
    assert generation.task_to_id == {"translate": 50358, "transcribe": 50359}
    assert generation.lang_to_id["<|en|>"] == 50259 and len(generation.lang_to_id) == 99
    features = processor(spoken_english, sampling_rate=16000, return_tensors="pt").input_features
    assert model.detect_language(features).tolist() == [50259]
    text = processor.batch_decode(model.generate(features), skip_special_tokens=True)[0]
    assert "fox" in text.lower() and "lazy dog" in text.lower()
    translated = processor.batch_decode(model.generate(features, task="translate"), skip_special_tokens=True)[0]
    assert "fox" in translated.lower()
