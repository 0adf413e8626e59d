"""Figures the reliability tests publish: each passing test records what it measured.

The report is JSON at `$PROTOSERVE_RELIABILITY_REPORT` (default: `bench-results/reliability-report.json`
under the repository root).
Writing merges into an existing report, so `make test` and `make soak` add up to one report;
`scripts/reliability_report.py` renders it as the README's "Reliability" section.

Figure names with a meaning in the totals: `requests_completed`, `requests_rejected`,
`faults_survived`, `inputs_tried`, `lost` (requests or tokens lost; a passing test records 0).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

REPORT_ENVIRONMENT_VARIABLE = "PROTOSERVE_RELIABILITY_REPORT"
DEFAULT_REPORT_PATH = Path(__file__).resolve().parents[2] / "bench-results" / "reliability-report.json"
Figure = int | float | str


def report_path() -> Path:
    configured = os.environ.get(REPORT_ENVIRONMENT_VARIABLE)
    return Path(configured) if configured else DEFAULT_REPORT_PATH


@dataclass
class ReliabilityRecorder:
    """Collects one entry per check during a session and merges them into the report file."""

    path: Path
    checks: dict[str, dict[str, object]] = field(default_factory=dict)

    def record(self, check: str, area: str, claim: str, **figures: Figure) -> None:
        """Record a passing check: `claim` says what held, `figures` what was measured."""
        if not figures:
            raise ValueError(f"check {check!r} records no figures")
        self.checks[check] = {
            "area": area,
            "claim": claim,
            "figures": figures,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def write(self) -> None:
        if not self.checks:
            return
        report: dict[str, object] = {"checks": {}}
        if self.path.exists():
            try:
                report = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                report = {"checks": {}}
        existing = report.get("checks")
        merged = dict(existing) if isinstance(existing, dict) else {}
        merged.update(self.checks)
        report["checks"] = merged
        report["environment"] = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        report["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        temporary.replace(self.path)
