"""scripts/reliability_report.py: totals, rows, marker replacement and its errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from reliability.recorder import ReliabilityRecorder

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "reliability_report.py"


@pytest.fixture(scope="module")
def report_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reliability_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recorded(path: Path) -> Path:
    first = ReliabilityRecorder(path)
    first.record("load.quick", "Load", "held | fine", requests_completed=41, requests_rejected=159, lost=0)
    first.write()
    second = ReliabilityRecorder(path)  # a later session (make soak) adds to the same report
    second.record("faults.kill", "Faults", "recovered", faults_survived=2, requests_completed=1, seconds=1.25)
    second.write()
    return path


def test_recorder_merges_sessions_and_refuses_empty_checks(tmp_path: Path) -> None:
    report = json.loads(_recorded(tmp_path / "report.json").read_text())
    assert set(report["checks"]) == {"load.quick", "faults.kill"}
    with pytest.raises(ValueError):
        ReliabilityRecorder(tmp_path / "other.json").record("empty", "Load", "nothing measured")


def test_section_has_totals_and_one_row_per_check(report_script: ModuleType, tmp_path: Path) -> None:
    section = report_script.render_section(report_script.load_report(_recorded(tmp_path / "report.json")))
    assert "| 42 | requests served" in section
    assert "| 159 | requests refused" in section
    assert "| 2 | faults survived" in section
    rows = [line for line in section.splitlines() if line.startswith("| Load") or line.startswith("| Faults")]
    assert len(rows) == 2 and rows[0].startswith("| Load"), "areas in the suite's order"
    assert "held \\| fine" in rows[0], "a | inside a claim must not break the table"


def test_readme_rewrite_between_markers(report_script: ModuleType, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- reliability:start -->\nold\n<!-- reliability:end -->\n\n## After\n")
    assert report_script.main(["--report", str(_recorded(tmp_path / "r.json")), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "`load.quick`" in text and text.endswith("<!-- reliability:end -->\n\n## After\n")
    assert report_script.main(["--report", str(tmp_path / "r.json"), "--readme", str(readme)]) == 0
    assert readme.read_text() == text, "running it twice changes nothing"


def test_errors_are_messages_not_tracebacks(
    report_script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_script.main(["--report", str(tmp_path / "missing.json")]) == 1
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert report_script.main(["--report", str(broken)]) == 1
    no_markers = tmp_path / "README.md"
    no_markers.write_text("# nothing here\n")
    assert report_script.main(["--report", str(_recorded(tmp_path / "r.json")), "--readme", str(no_markers)]) == 1
    errors = capsys.readouterr().err
    assert "does not exist" in errors and "not valid JSON" in errors and "reliability:start" in errors
    assert no_markers.read_text() == "# nothing here\n"
