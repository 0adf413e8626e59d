"""Build a model folder at most once, atomically, and safely across concurrent processes.

Invariants kept for every folder `DEST` under the cache directory:
- `DEST` exists only complete: it is built in a temporary sibling `.DEST.tmp-*` and moved into place
  with `os.replace` after its marker file, written last, is in it.
- `DEST` counts as built when its marker (`protoserve-demo.json`) holds the expected identity
  (source wheel, version, format version); anything else is rebuilt.
- One process builds `DEST` at a time (`fcntl.flock` on `.DEST.lock`); a process that waited on the
  lock finds the folder built and returns at once.
- Temporary siblings left by a killed run are removed by the next build of the same folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER_FILE_NAME = "protoserve-demo.json"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker's content, or None when the folder or its marker is missing or unreadable."""
    try:
        content = json.loads((folder / MARKER_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def is_built(folder: Path, identity: Mapping[str, Any]) -> bool:
    """True when `folder` holds a marker whose entries include every item of `identity`."""
    marker = read_marker(folder)
    if marker is None:
        return False
    return all(marker.get(key) == value for key, value in identity.items())


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (created if missing) for the `with` block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def temporary_prefix(destination: Path) -> str:
    """Name prefix of the temporary siblings used while building `destination`."""
    return f".{destination.name}.tmp-"


def remove_stale_temporaries(destination: Path) -> list[Path]:
    """Delete temporary siblings left by an interrupted build; call only while holding the lock."""
    removed = []
    for stale in destination.parent.glob(temporary_prefix(destination) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed


def build_folder_atomically(
    destination: Path,
    identity: Mapping[str, Any],
    build: Callable[[Path], None],
) -> bool:
    """Make sure `destination` is built with `identity`; return True when this call built it.

    `build(work_dir)` fills an empty temporary directory; on any exception the temporary directory
    is removed and the exception propagates, leaving `destination` as it was.
    """
    if is_built(destination, identity):
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(destination.parent / f".{destination.name}.lock"):
        if is_built(destination, identity):
            return False
        remove_stale_temporaries(destination)
        work_dir = Path(tempfile.mkdtemp(prefix=temporary_prefix(destination), dir=destination.parent))
        try:
            build(work_dir)
            work_dir.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache/huggingface
            marker = dict(identity)
            (work_dir / MARKER_FILE_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            if destination.exists():
                # An outdated or incomplete folder: move it aside (atomic), then delete it.
                outdated = Path(tempfile.mkdtemp(prefix=temporary_prefix(destination), dir=destination.parent))
                os.replace(destination, outdated / destination.name)
                shutil.rmtree(outdated, ignore_errors=True)
            os.replace(work_dir, destination)
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
    return True
