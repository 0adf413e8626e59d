"""scripts/bench_report.py: how repeats of a level become one row and how the ratios pair them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_report.py"


@pytest.fixture(scope="module")
def bench_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def level(tokens_per_s: float, ttft: float, *, rss: float = 100.0, load: float = 1.0, errors: int = 0) -> dict:
    return {
        "concurrency": 16,
        "output_tokens_per_s": tokens_per_s,
        "requests_per_s": tokens_per_s / 64,
        "ttft_p50_s": ttft,
        "ttft_p90_s": ttft * 2,
        "itl_p50_s": 0.03,
        "itl_p90_s": 0.04,
        "peak_rss_mib": rss,
        "tokens_per_request": 64.0,
        "errors": errors,
        "load_average": load,
    }


def test_median_row_is_one_real_repeat_with_every_repeat_kept(bench_report: ModuleType) -> None:
    repeats = [level(500, 0.2, rss=10), level(450, 0.5, rss=30, load=2.5), level(520, 0.1, errors=1)]
    row = bench_report.median_of_repeats(repeats)
    # The median throughput's repeat, whole: its TTFT is that repeat's, not the median TTFT of all.
    assert row["output_tokens_per_s"] == 500 and row["ttft_p50_s"] == 0.2
    assert row["repeat_tokens_per_s"] == [500, 450, 520]  # in the order they ran
    assert row["repeat_ttft_p50_s"] == [0.2, 0.5, 0.1]
    assert row["peak_rss_mib"] == 100 and row["load_average"] == 2.5 and row["errors"] == 1
    assert repeats[0]["peak_rss_mib"] == 10  # the inputs are not changed


def test_even_count_takes_the_lower_middle_and_one_repeat_is_itself(bench_report: ModuleType) -> None:
    assert bench_report.median_of_repeats([level(300, 1), level(100, 1)])["output_tokens_per_s"] == 100
    assert bench_report.median_of_repeats([level(300, 1)])["output_tokens_per_s"] == 300
    with pytest.raises(ValueError):
        bench_report.median_of_repeats([])


def test_ratios_come_from_the_median_rows_and_pair_the_repeats(bench_report: ModuleType) -> None:
    report: dict[str, list[dict[str, Any]]] = {
        "transformers/rest": [bench_report.median_of_repeats([level(100, 1.0), level(90, 1.2), level(110, 0.9)])],
        "protoserve/rest": [bench_report.median_of_repeats([level(500, 0.1), level(540, 0.1), level(450, 0.2)])],
        "protoserve/grpc": [bench_report.median_of_repeats([level(520, 0.1), level(540, 0.1), level(500, 0.1)])],
    }
    (row,) = bench_report.ratio_rows(report, [16])
    assert row["throughput_x"] == pytest.approx(5.0)  # median 500 over median 100
    assert row["ttft_p50_fraction"] == pytest.approx(0.1)
    assert row["throughput_x_repeats"] == pytest.approx([5.0, 6.0, 450 / 110])
    assert row["translator_efficiency"] == pytest.approx(500 / 520)
    assert row["translator_efficiency_repeats"] == pytest.approx([500 / 520, 1.0, 450 / 500])


def test_results_without_repeats_have_no_paired_ratios(bench_report: ModuleType) -> None:
    # A bench.json written before --repeats existed still renders.
    report = {"transformers/rest": [level(100, 1.0)], "protoserve/rest": [level(500, 0.2)]}
    (row,) = bench_report.ratio_rows(report, [16])
    assert row["throughput_x"] == pytest.approx(5.0)
    assert "throughput_x_repeats" not in row


def test_readme_section_names_the_schedule_and_the_repeats(bench_report: ModuleType) -> None:
    rows = {
        "transformers/rest": [bench_report.median_of_repeats([level(100, 1.0), level(90, 1.2)])],
        "protoserve/rest": [bench_report.median_of_repeats([level(500, 0.1), level(540, 0.1)])],
    }
    settings = {
        "model": "m",
        "dtype": "float32",
        "device": "cpu",
        "concurrency": [16],
        "output_len": 64,
        "prompt_tokens": 76,
        "rounds": 2,
        "min_requests": 4,
        "protoserve_flags": "",
        "transformers_version": "5.0",
        "repeats": 2,
        "interleave": True,
    }
    result = {"date": "today", "machine": "here", "settings": settings, "results": rows}
    section = bench_report.readme_section(result)
    assert "Both servers were up for the whole run" in section
    assert "Each level ran 2 times per driver" in section
    # Medians (lower middle of two): 500 over 90; the pairs: 500 over 100, 540 over 90.
    assert "| 16 | 5.56 | 5.00/6.00 |" in section
    sequential = bench_report.readme_section({**result, "settings": {**settings, "interleave": False, "repeats": 1}})
    assert "one after the other" in sequential and "times per driver" not in sequential


def gpu_result(bench_report: ModuleType) -> dict[str, Any]:
    rows = {
        "transformers/rest": [{**level(1000, 0.5), "concurrency": 64}],
        "protoserve/rest": [{**level(2500, 0.1), "concurrency": 64}],
    }
    settings = {
        "model": "Llama-1B_random",
        "dtype": "bfloat16",
        "device": "cuda",
        "concurrency": [64],
        "output_len": 64,
        "prompt_tokens": 76,
        "rounds": 2,
        "min_requests": 4,
        "protoserve_flags": "",
        "transformers_version": "5.17.0",
        "repeats": 1,
        "interleave": False,
    }
    return {"date": "today", "machine": "NVIDIA H100 (79 GiB), CUDA 13.0; here", "settings": settings, "results": rows}


def test_a_gpu_section_checks_the_gpu_target_and_names_its_own_plot(bench_report: ModuleType) -> None:
    section = bench_report.readme_section(gpu_result(bench_report), image="docs/bench-gpu-llama-1b-random.png")
    assert "throughput at 64 streams >= 2x transformers serve --continuous-batching: 2.50 (met)" in section
    assert "at 16 streams" not in section
    assert "(docs/bench-gpu-llama-1b-random.png)" in section and "NVIDIA H100" in section


def test_a_new_section_goes_after_the_cpu_one_and_is_replaced_alone(bench_report: ModuleType, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    cpu_section = "<!-- performance:start -->\ncpu table\n<!-- performance:end -->"
    readme.write_text(f"# x\n\n## Performance\n\n{cpu_section}\n\n## Reliability\n")
    bench_report.write_readme_section(readme, "gpu table 1", "performance-gpu-m")
    bench_report.write_readme_section(readme, "gpu table 2", "performance-gpu-m")
    text = readme.read_text()
    assert text == (
        f"# x\n\n## Performance\n\n{cpu_section}\n\n<!-- performance-gpu-m:start -->\ngpu table 2\n"
        "<!-- performance-gpu-m:end -->\n\n## Reliability\n"
    )
    bench_report.write_readme_section(readme, "cpu table 2")
    assert "cpu table 2" in readme.read_text() and "gpu table 2" in readme.read_text()
    other = tmp_path / "other.md"
    other.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no <!-- performance:start -->"):
        bench_report.write_readme_section(other, "x")
    with pytest.raises(ValueError, match="to add the performance-gpu-m section after"):
        bench_report.write_readme_section(other, "x", "performance-gpu-m")


def test_bench_picks_the_section_and_plot_by_device() -> None:
    spec = importlib.util.spec_from_file_location("bench_under_test", SCRIPT.parent / "bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    assert bench.readme_target({"device": "cpu", "model": "m"}, None) == ("performance", "docs/bench-cpu.png")
    assert bench.readme_target({"device": "cuda", "model": "Llama-1B_random"}, None) == (
        "performance-gpu-llama-1b-random",
        "docs/bench-gpu-llama-1b-random.png",
    )
    assert bench.readme_target({"device": "cuda", "model": "m"}, "performance-h100") == (
        "performance-h100",
        "docs/bench-h100.png",
    )
