"""The README keeps its promises: the two commands, and a map of the code that matches the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_start_shows_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_map_of_the_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "readme_map.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_linked_documents_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in ("docs/deploying.md", "docs/agents.md"):
        if f"({target})" in readme:
            assert (ROOT / target).exists(), target
