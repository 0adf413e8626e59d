"""Build-once, atomic, lock-protected model folders."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from protoserve.server.demo_models.atomic_folder import (
    MARKER_FILE_NAME,
    build_folder_atomically,
    is_built,
    read_marker,
)

IDENTITY = {"model": "test", "format_version": 1}


def write_weights(work_dir: Path) -> None:
    (work_dir / "weights.bin").write_bytes(b"\1" * 1024)


def leftovers(destination: Path) -> list[Path]:
    return sorted(destination.parent.glob(f".{destination.name}.tmp-*"))


def test_builds_once_and_writes_the_marker(tmp_path: Path) -> None:
    destination = tmp_path / "model"
    assert build_folder_atomically(destination, IDENTITY, write_weights) is True
    assert (destination / "weights.bin").stat().st_size == 1024
    assert read_marker(destination) == IDENTITY
    assert is_built(destination, IDENTITY)

    def must_not_run(work_dir: Path) -> None:
        raise AssertionError("a built folder was rebuilt")

    assert build_folder_atomically(destination, IDENTITY, must_not_run) is False
    assert leftovers(destination) == []


def test_a_build_that_raises_midway_leaves_nothing(tmp_path: Path) -> None:
    destination = tmp_path / "model"

    def fail_midway(work_dir: Path) -> None:
        write_weights(work_dir)
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build_folder_atomically(destination, IDENTITY, fail_midway)
    assert not destination.exists()
    assert leftovers(destination) == []


def test_a_killed_run_is_cleaned_by_the_next_run(tmp_path: Path) -> None:
    destination = tmp_path / "model"
    # What a killed run leaves behind: a temporary sibling without a marker.
    stale = tmp_path / ".model.tmp-killed"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"half")
    assert not is_built(destination, IDENTITY)
    build_folder_atomically(destination, IDENTITY, write_weights)
    assert is_built(destination, IDENTITY)
    assert leftovers(destination) == []


def test_a_folder_without_marker_or_with_another_identity_is_rebuilt(tmp_path: Path) -> None:
    destination = tmp_path / "model"
    destination.mkdir()
    (destination / "weights.bin").write_bytes(b"old")
    assert not is_built(destination, IDENTITY)
    build_folder_atomically(destination, IDENTITY, write_weights)
    assert (destination / "weights.bin").read_bytes() == b"\1" * 1024

    newer = {**IDENTITY, "format_version": 2}
    assert not is_built(destination, newer)
    build_folder_atomically(destination, newer, lambda work_dir: (work_dir / "v2").write_text("2"))
    assert read_marker(destination) == newer
    assert not (destination / "weights.bin").exists()
    assert leftovers(destination) == []


def test_unreadable_marker_counts_as_not_built(tmp_path: Path) -> None:
    destination = tmp_path / "model"
    destination.mkdir()
    (destination / MARKER_FILE_NAME).write_text("{not json", encoding="utf-8")
    assert read_marker(destination) is None
    assert not is_built(destination, IDENTITY)
    (destination / MARKER_FILE_NAME).write_text("[1, 2]", encoding="utf-8")
    assert not is_built(destination, IDENTITY)


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    destination = tmp_path / "model"
    builds: list[int] = []
    results: list[bool] = []

    def slow_build(work_dir: Path) -> None:
        builds.append(threading.get_ident())
        time.sleep(0.3)
        write_weights(work_dir)

    def run() -> None:
        results.append(build_folder_atomically(destination, IDENTITY, slow_build))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert sorted(results) == [False, False, True]
    assert is_built(destination, IDENTITY) and leftovers(destination) == []
