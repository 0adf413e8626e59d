"""Fixtures shared by the whole suite. Folder-level conftest.py files add their own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from protoserve.server.demo_models import DemoModels

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_models() -> DemoModels:
    """Folders of the three demo models (chat, speech, vision), fetched and converted once.

    `make test` runs `protoserve models fetch-demo` first, so this only finds them in the cache.
    """
    from protoserve.server.demo_models import fetch_demo_models

    return fetch_demo_models()


@pytest.fixture(scope="session")
def chat_model_path(demo_models: DemoModels) -> Path:
    """The converted SmolLM2-135M-Instruct folder."""
    return demo_models.chat
