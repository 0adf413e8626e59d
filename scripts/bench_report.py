"""Turning scripts/bench.py results into a console table, ratios, a PNG plot and the README section.

The results are `{server name: [one row per concurrency level]}`, each row a `LoadResult.as_dict()`
plus `peak_rss_mib` and the load average around the level. Server names are `transformers/rest`,
`protoserve/rest` and `protoserve/grpc`; ratios compare protoserve's REST figures with
transformers serve's, and protoserve's REST throughput with its own gRPC throughput.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path
from typing import Any

Report = dict[str, list[dict[str, Any]]]

README_END = "<!-- performance:end -->"  # the CPU run's section ends here; others follow it
# The targets, checked in the README section (ratios measured in one run).
TARGET_THROUGHPUT_AT_16 = 5.0
TARGET_THROUGHPUT_AT_1 = 2.0
TARGET_TTFT_FRACTION_AT_16 = 1 / 3
TARGET_TRANSLATOR_EFFICIENCY_AT_16 = 0.9
# On a GPU: throughput at 64 streams against transformers serve --continuous-batching.
TARGET_GPU_THROUGHPUT_AT_64 = 2.0


def row_at(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((row for row in rows if row["concurrency"] == concurrency), None)


def median_of_repeats(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's row from its repeats: the repeat with the median output throughput (the lower
    middle of an even count), so that the row's figures all come from one measurement. Every
    repeat's throughput and TTFT p50 are kept in `repeat_tokens_per_s` / `repeat_ttft_p50_s` (in
    the order they ran); peak RSS and load are the highest of all repeats, errors their sum."""
    if not repeats:
        raise ValueError("a level needs at least one repeat")
    ranked = sorted(repeats, key=lambda row: row["output_tokens_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["repeat_tokens_per_s"] = [r["output_tokens_per_s"] for r in repeats]
    row["repeat_ttft_p50_s"] = [r["ttft_p50_s"] for r in repeats]
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in repeats)
    row["load_average"] = max(r["load_average"] for r in repeats)
    row["errors"] = sum(r["errors"] for r in repeats)
    return row


def _paired_ratios(numerator: dict[str, Any], denominator: dict[str, Any]) -> list[float]:
    """Repeat i of one driver over repeat i of another (they ran side by side), when both have repeats."""
    tops, bottoms = numerator.get("repeat_tokens_per_s", []), denominator.get("repeat_tokens_per_s", [])
    if len(tops) < 2 or len(tops) != len(bottoms):
        return []
    return [top / max(bottom, 1e-9) for top, bottom in zip(tops, bottoms, strict=True)]


def ratio_rows(report: Report, concurrencies: list[int]) -> list[dict[str, Any]]:
    """Per concurrency: protoserve/transformers throughput and TTFT p50, and REST/gRPC throughput,
    from the median rows; with repeats, also the throughput ratio of each pair of repeats."""
    rows = []
    for concurrency in concurrencies:
        rest = row_at(report.get("protoserve/rest", []), concurrency)
        transformers = row_at(report.get("transformers/rest", []), concurrency)
        grpc = row_at(report.get("protoserve/grpc", []), concurrency)
        row: dict[str, Any] = {"concurrency": concurrency}
        if rest and transformers:
            row["throughput_x"] = rest["output_tokens_per_s"] / max(transformers["output_tokens_per_s"], 1e-9)
            row["ttft_p50_fraction"] = rest["ttft_p50_s"] / max(transformers["ttft_p50_s"], 1e-9)
            if paired := _paired_ratios(rest, transformers):
                row["throughput_x_repeats"] = paired
        if rest and grpc:
            row["translator_efficiency"] = rest["output_tokens_per_s"] / max(grpc["output_tokens_per_s"], 1e-9)
            if paired := _paired_ratios(rest, grpc):
                row["translator_efficiency_repeats"] = paired
        if len(row) > 1:
            rows.append(row)
    return rows


def _format_ratio_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list):
        return "/".join(f"{item:.2f}" for item in value)
    return str(value)


def print_table(report: Report, concurrencies: list[int]) -> None:
    header = (
        f"{'server':<22}{'conc':>5}{'tok/s':>9}{'req/s':>8}{'TTFT p50':>10}{'TTFT p90':>10}"
        f"{'ITL p50':>9}{'ITL p90':>9}{'RSS MiB':>9}{'tok/req':>8}{'err':>5}{'load':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, rows in report.items():
        for row in rows:
            print(
                f"{name:<22}{row['concurrency']:>5}{row['output_tokens_per_s']:>9.1f}{row['requests_per_s']:>8.2f}"
                f"{row['ttft_p50_s']:>10.3f}{row['ttft_p90_s']:>10.3f}{row['itl_p50_s'] * 1e3:>8.1f}m"
                f"{row['itl_p90_s'] * 1e3:>8.1f}m{row['peak_rss_mib']:>9.0f}{row['tokens_per_request']:>8.1f}"
                f"{row['errors']:>5}{row['load_average']:>6.1f}"
            )
    ratios = ratio_rows(report, concurrencies)
    if ratios:
        print("\nratios (protoserve / transformers serve, REST; translator = REST / gRPC)")
        for row in ratios:
            print("  " + "  ".join(f"{key}={_format_ratio_value(value)}" for key, value in row.items()))


def plot(report: Report, path: Path, title: str) -> None:
    """Throughput and TTFT p50 against concurrency, one line per server; a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in report.items():
        xs = [r["concurrency"] for r in rows]
        throughput.plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", label=name)
        ttft.plot(xs, [r["ttft_p50_s"] for r in rows], marker="o", label=name)
    for axis, label in ((throughput, "output tokens/s"), (ttft, "TTFT p50 (s, log)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    ttft.set_yscale("log")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def describe_machine() -> str:
    """CPU model, cores, memory, torch and transformers versions: what the figures depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
        flag_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        flags = set(flag_line.group(1).split()) if flag_line else set()
        # The widest vector unit decides which kernels win (packed_linear), so it is named.
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
        cpu = f"{cpu} ({simd})" if simd else cpu
    except OSError:
        pass
    memory = ""
    try:
        match = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        memory = f", {int(match.group(1)) / 2**20:.0f} GiB RAM" if match else ""
    except OSError:
        pass
    accelerator = _describe_accelerator()
    versions = []
    for module in ("torch", "transformers"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return (
        f"{accelerator}{cpu}, {os.cpu_count()} cores{memory}; {', '.join(versions)}; Python {platform.python_version()}"
    )


def _describe_accelerator() -> str:
    """ "NVIDIA H100 80GB HBM3 (79 GiB), CUDA 13.0; " when torch sees a GPU, else ""."""
    try:
        import torch
    except ImportError:
        return ""
    if not torch.cuda.is_available():
        return ""
    properties = torch.cuda.get_device_properties(0)
    return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}; "


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    return f"{value:.2f} ({'met' if met else 'missed'})"


def readme_section(
    result: dict[str, Any], engine_result: dict[str, Any] | None = None, image: str = "docs/bench-cpu.png"
) -> str:
    """The Markdown between a performance section's markers: setup, results, ratios, targets, notes.
    The targets are the CPU's, or the GPU's when the run was on another device."""
    report: Report = result["results"]
    settings = result["settings"]
    concurrencies = [int(c) for c in settings["concurrency"]]
    lines = [
        f"Measured {result['date']} by `python scripts/bench.py --write-readme` on {result['machine']}.",
        f"Model {settings['model']} ({settings['dtype']}, {settings['device']}), prompt ~{settings['prompt_tokens']} "
        f"tokens (chat template included), {settings['output_len']} output tokens per request (forced: "
        "`min_tokens` / `min_new_tokens`), greedy, closed loop of streamed chat completions, "
        f"{settings['rounds']} x concurrency requests per level (at least {settings['min_requests']}). "
        f"protoserve ran with {settings['protoserve_flags'] or 'default flags'}; transformers serve "
        f"{settings['transformers_version']} with `--continuous-batching`. Client, translator and servers share the "
        f"same cores. {_schedule_sentence(settings)} `load` is the 1-minute load average during the level "
        "(other work on the machine shows there).",
        "",
        f"![throughput and TTFT against concurrency]({image})",
        "",
        "| server | streams | output tok/s | req/s | TTFT p50 | TTFT p90 | ITL p50 | ITL p90 | peak RSS | tok/req "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency in concurrencies:
        for name, rows in report.items():
            row = row_at(rows, concurrency)
            if row is None:
                continue
            lines.append(
                f"| {name} | {concurrency} | {row['output_tokens_per_s']:.1f} | {row['requests_per_s']:.2f} | "
                f"{row['ttft_p50_s']:.2f} s | {row['ttft_p90_s']:.2f} s | {row['itl_p50_s'] * 1e3:.0f} ms | "
                f"{row['itl_p90_s'] * 1e3:.0f} ms | {row['peak_rss_mib']:.0f} MiB | {row['tokens_per_request']:.1f} | "
                f"{row['load_average']:.1f} |" + (f" errors: {row['errors']}" if row["errors"] else "")
            )
    ratios = ratio_rows(report, concurrencies)
    if ratios:
        lines += [
            "",
            "| streams | throughput protoserve / transformers serve | each repeat | TTFT p50 protoserve / "
            "transformers serve | REST / gRPC throughput | each repeat |",
            "|---|---|---|---|---|---|",
        ]
        keys = ("throughput_x", "throughput_x_repeats", "ttft_p50_fraction", "translator_efficiency",
                "translator_efficiency_repeats")  # fmt: skip
        for row in ratios:
            cells = [_format_ratio_value(row[key]) if key in row else "-" for key in keys]
            lines.append(f"| {row['concurrency']} | " + " | ".join(cells) + " |")
    lines += ["", _targets_sentence(settings, {row["concurrency"]: row for row in ratios})]
    if engine_result:
        lines += ["", f"Engine alone (`scripts/bench_engine.py`): {engine_result['summary']}"]
    notes = [note for note in settings.get("notes", []) if note]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


def _targets_sentence(settings: dict[str, Any], by_concurrency: dict[int, dict[str, Any]]) -> str:
    """The issue's targets with the measured ratios: the CPU's four, or the GPU's one."""
    at_64, at_16, at_1 = (by_concurrency.get(level, {}) for level in (64, 16, 1))
    if settings.get("device", "cpu") != "cpu":
        return (
            "Target (issue: ratio in one run): throughput at 64 streams >= "
            f"{TARGET_GPU_THROUGHPUT_AT_64:.0f}x transformers serve --continuous-batching: "
            f"{_verdict(at_64.get('throughput_x'), TARGET_GPU_THROUGHPUT_AT_64, True)}."
        )
    return (
        "Targets (issue: ratios in one run): "
        f"throughput at 16 streams >= {TARGET_THROUGHPUT_AT_16:.0f}x: "
        f"{_verdict(at_16.get('throughput_x'), TARGET_THROUGHPUT_AT_16, True)}; "
        f"TTFT p50 at 16 <= 1/3: {_verdict(at_16.get('ttft_p50_fraction'), TARGET_TTFT_FRACTION_AT_16, False)}; "
        f"throughput at 1 stream >= {TARGET_THROUGHPUT_AT_1:.0f}x: "
        f"{_verdict(at_1.get('throughput_x'), TARGET_THROUGHPUT_AT_1, True)}; "
        f"REST >= 90% of gRPC at 16: "
        f"{_verdict(at_16.get('translator_efficiency'), TARGET_TRANSLATOR_EFFICIENCY_AT_16, True)}."
    )


def _schedule_sentence(settings: dict[str, Any]) -> str:
    """How the levels were run: repeats, and whether the servers took turns (bench.py --interleave)."""
    repeats = int(settings.get("repeats", 1))
    if settings.get("interleave"):
        schedule = (
            "Both servers were up for the whole run and every driver (transformers serve, protoserve REST, "
            "protoserve gRPC) took its turn at each level, so a slow spell of the machine falls on all of them."
        )
    else:
        schedule = "The servers ran one after the other; protoserve's REST and gRPC drivers took turns at each level."
    if repeats > 1:
        schedule += (
            f" Each level ran {repeats} times per driver; a row is the driver's median repeat (by throughput) and "
            "the ratios come from those rows, with the ratio of each pair of repeats that ran side by side next "
            "to them."
        )
    return schedule


def section_markers(name: str) -> tuple[str, str]:
    """The comment lines around a generated section: `performance` is the CPU run's."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_readme_section(readme: Path, section: str, name: str = "performance") -> None:
    """Replace what sits between the markers of section `name` (and nothing else). A section other
    than `performance` that the README lacks yet is added right after the `performance` section."""
    text = readme.read_text()
    start_marker, end_marker = section_markers(name)
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 and end < 0 and name != "performance":
        anchor = text.find(README_END)
        if anchor < 0:
            raise ValueError(f"{readme} has no {README_END} to add the {name} section after")
        anchor += len(README_END)
        text = text[:anchor] + f"\n\n{start_marker}\n{end_marker}" + text[anchor:]
        start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {start_marker} ... {end_marker} section")
    readme.write_text(text[: start + len(start_marker)] + "\n" + section + "\n" + text[end:])


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
