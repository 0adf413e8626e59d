"""Fixtures shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .engine_fixtures import build_model, tiny_llama_config, word_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama with its word tokenizer: a complete model folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_model(tiny_llama_config()).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
