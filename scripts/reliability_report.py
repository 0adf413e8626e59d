"""Render the reliability suite's figures as the README's "Reliability" section.

The suite (`tests/reliability/`) writes `bench-results/reliability-report.json` (or the path in
`$PROTOSERVE_RELIABILITY_REPORT`); each passing check records a claim and its figures. This script
turns that file into markdown: totals first (requests held, rejected as asked, faults survived,
inputs tried, lost), then one row per check. Without `--readme` it prints the section; with it, it
replaces the text between `<!-- reliability:start -->` and `<!-- reliability:end -->` in that file.

    python scripts/reliability_report.py                  # print
    python scripts/reliability_report.py --readme README.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

START_MARKER = "<!-- reliability:start -->"
END_MARKER = "<!-- reliability:end -->"
DEFAULT_REPORT = Path("bench-results") / "reliability-report.json"
AREA_ORDER = ["Load", "Cancellation", "Isolation", "Faults", "Bad input", "Security", "Soak"]
TOTALS = [
    ("requests_completed", "requests served to completion under load, faults and soak"),
    ("requests_cancelled", "requests abandoned by their clients and cleaned up"),
    ("requests_rejected", "requests refused as the limits and faults call for (429, 503, UNAVAILABLE), never a 5xx"),
    ("faults_survived", "faults survived (killed server, failing engine step, full KV cache, SIGTERM)"),
    ("inputs_tried", "hostile or unauthorised inputs tried (fuzzing, path tricks, SSRF URLs, TLS)"),
    ("lost", "requests or tokens lost"),
]


class ReportError(Exception):
    """The report or the README cannot be used; the message says why."""


def load_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist: run the reliability suite first (make test, make soak)") from None
    except ValueError as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(report, dict) or not isinstance(report.get("checks"), dict):
        raise ReportError(f"{path} has no 'checks' object; is it a reliability report?")
    return report


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _figures(figures: dict[str, Any]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {_number(value)}" for name, value in sorted(figures.items()))


def _area_rank(check: dict[str, Any]) -> int:
    area = check.get("area", "")
    return AREA_ORDER.index(area) if area in AREA_ORDER else len(AREA_ORDER)


def render_section(report: dict[str, Any]) -> str:
    """The markdown between the markers (without the markers)."""
    checks: dict[str, dict[str, Any]] = report["checks"]
    lines = [
        "The reliability suite (`tests/reliability/`) measured these figures itself; "
        "`scripts/reliability_report.py` renders them from its report. Quick checks run in `make test`, "
        "long ones in `make soak`.",
        "",
    ]
    environment = report.get("environment", {})
    if environment:
        lines += [
            f"Last updated {report.get('updated_at', 'unknown')} on {environment.get('cpus', '?')} CPUs "
            f"({environment.get('machine', '?')}, Python {environment.get('python', '?')}).",
            "",
        ]
    lines += ["| total | what |", "|---:|---|"]
    for key, meaning in TOTALS:
        total = sum(
            check.get("figures", {}).get(key, 0)
            for check in checks.values()
            if isinstance(check.get("figures", {}).get(key, 0), (int, float))
        )
        lines.append(f"| {_number(total)} | {meaning} |")
    lines += ["", "| area | check | what held | figures |", "|---|---|---|---|"]
    for name, check in sorted(checks.items(), key=lambda item: (_area_rank(item[1]), item[0])):
        claim = str(check.get("claim", "")).replace("|", "\\|")
        lines.append(f"| {check.get('area', '?')} | `{name}` | {claim} | {_figures(check.get('figures', {}))} |")
    return "\n".join(lines)


def replace_between_markers(document: str, section: str) -> str:
    """`document` with the text between the markers replaced by `section`."""
    start = document.find(START_MARKER)
    end = document.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ReportError(f"the README needs {START_MARKER} followed by {END_MARKER}")
    return document[: start + len(START_MARKER)] + "\n" + section + "\n" + document[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the reliability report as the README section.")
    default_report = Path(os.environ.get("PROTOSERVE_RELIABILITY_REPORT") or DEFAULT_REPORT)
    parser.add_argument(
        "--report", type=Path, default=default_report, help=f"the JSON report (default {default_report})"
    )
    parser.add_argument("--readme", type=Path, help="rewrite the section between the markers in this file")
    args = parser.parse_args(argv)
    try:
        section = render_section(load_report(args.report))
        if args.readme is None:
            print(section)
            return 0
        document = args.readme.read_text(encoding="utf-8")
        args.readme.write_text(replace_between_markers(document, section), encoding="utf-8")
    except (ReportError, OSError) as error:
        print(f"reliability_report: {error}", file=sys.stderr)
        return 1
    print(f"wrote the Reliability section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
