"""protoserve against `transformers serve --continuous-batching`, side by side, on one machine.

Starts each server on the same model folder, warms it, and drives it with the same closed-loop
streamed load through the OpenAI API at each concurrency (greedy, every request forced to
exactly --output-len tokens). protoserve is also driven through its gRPC API directly, so the
translator's overhead shows as its own ratio. Prints one table, writes a JSON file and a PNG plot.

A shared machine's speed drifts by more than the differences worth measuring, so on the CPU both
servers stay up for the whole run and the three drivers take turns at each level (--interleave;
an idle server uses no CPU), each level --repeats times: a table row is a driver's median repeat,
and the ratio of every pair of repeats that ran side by side is kept next to the median ratio.
On an accelerator the servers run one after the other (two would share its memory).

    python scripts/bench.py                      # demo chat model, concurrency 1 4 16 64
    python scripts/bench.py --concurrency 1 16 --output-len 64 --servers protoserve
    python scripts/bench.py --write-readme       # also README's performance section, docs/bench-cpu.png
    python scripts/bench.py --from-json bench-results/bench.json --write-readme   # re-render, no runs
    python scripts/bench.py --from-json results/bench-llama-1b-random/bench.json --write-readme \
        --engine-json results/bench_engine.json   # a GPU run (scripts/gpu_check.sh): its own README section

`transformers serve` runs from --ts-python (default `.venv-bench/bin/python`, made with
`python3.11 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 'transformers[serving]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import LoadResult, RequestTiming, describe, grpc_chat_stream, openai_chat_stream, run_closed_loop  # noqa: E402
from bench_report import (  # noqa: E402
    describe_machine,
    median_of_repeats,
    plot,
    print_table,
    ratio_rows,
    readme_section,
    today,
    write_readme_section,  # noqa: E402
)

ROOT = Path(__file__).resolve().parent.parent
PROMPT_WORD = "tell me a long story about the sea and the ships that sail on it "


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PeakMemory:
    """Samples the resident memory of a process tree in a thread; `peak_mib` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def sample(self) -> None:
        """One reading now (also called at the end of each level: a level can be shorter than the period)."""
        try:
            tree = [self.process, *self.process.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in tree if p.is_running())
        except psutil.Error:
            return
        self.peak_mib = max(self.peak_mib, rss / 2**20)

    def reset(self) -> None:
        self.peak_mib = 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class ServerProcess:
    """A server started as a child process group, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, command: list[str], base_url: str, log_path: Path) -> None:
        self.name = name
        self.base_url = base_url
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        self.memory = PeakMemory(self.process.pid)

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log.name}")
                try:
                    # /health, not /v1/models: transformers serve answers 500 there without a hub cache.
                    async with session.get(f"{self.base_url}/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f}s; see {self.log.name}")

    def stop(self) -> None:
        self.memory.stop()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def chat_body(model: str, prompt: str, output_len: int, server: str) -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "stream": True,
        "temperature": 0.0,
        "max_tokens": output_len,
        "messages": [{"role": "user", "content": prompt}],
    }
    if server == "transformers":
        body["generation_config"] = json.dumps(
            {"max_new_tokens": output_len, "min_new_tokens": output_len, "do_sample": False}
        )
    else:
        body["min_tokens"] = output_len
        body["stream_options"] = {"include_usage": True}
    return body


Driver = Callable[[], Awaitable[RequestTiming]]


@asynccontextmanager
async def openai_driver(
    server: ServerProcess, model: str, args: argparse.Namespace, prompt: str
) -> AsyncIterator[Driver]:
    """One streamed chat completion through an OpenAI-compatible API per call, warmed up."""
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        body = chat_body(model, prompt, args.output_len, server.name.split("/")[0])

        async def one() -> RequestTiming:
            return await openai_chat_stream(session, server.base_url, body)

        await run_closed_loop(one, concurrency=2, num_requests=2)  # warm-up
        yield one


async def measure_level(
    label: str, memory: PeakMemory, one: Driver, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One load level: its figures, the peak RSS of the server tree and the load average."""
    memory.reset()
    load_before = os.getloadavg()[0]
    result: LoadResult = await run_closed_loop(one, concurrency, requests_for(concurrency, args))
    memory.sample()
    load_average = max(load_before, os.getloadavg()[0])
    print(f"{label:<28} {describe(result)} load {load_average:.1f}", flush=True)
    return {**result.as_dict(), "peak_rss_mib": memory.peak_mib, "load_average": load_average}


@asynccontextmanager
async def grpc_driver(target: str, model: str, args: argparse.Namespace, prompt: str) -> AsyncIterator[Driver]:
    """One streamed Chat call through protoserve's gRPC API per call, warmed up."""
    from protoserve.client.channel import create_async_channel
    from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

    async with create_async_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.ChatRequest(
            model=model,
            messages=[generation_pb2.ChatMessage(role="user", content=[generation_pb2.ContentPart(text=prompt)])],
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=args.output_len, min_tokens=args.output_len),
        )

        async def one() -> RequestTiming:
            return await grpc_chat_stream(stub, request)

        await run_closed_loop(one, concurrency=2, num_requests=2)
        yield one


@dataclass
class Target:
    """One way of driving one server: its closed-loop call and the memory sampler of its server."""

    one: Driver
    memory: PeakMemory


async def measure_levels(targets: dict[str, Target], args: argparse.Namespace) -> dict[str, list]:
    """Every level, --repeats times, the drivers taking turns within each repeat (so that a slow
    spell of a shared machine does not fall on one driver's levels only); each driver's row per
    level is its median repeat (bench_report.median_of_repeats)."""
    results: dict[str, list] = {name: [] for name in targets}
    for concurrency in args.concurrency:
        repeats: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for repeat in range(args.repeats):
            for name, target in targets.items():
                label = f"{name} #{repeat + 1}" if args.repeats > 1 else name
                repeats[name].append(await measure_level(label, target.memory, target.one, concurrency, args))
        for name in targets:
            results[name].append(median_of_repeats(repeats[name]))
    return results


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    rounds = args.rounds_at_64 if concurrency >= 64 and args.rounds_at_64 else args.rounds
    return max(args.min_requests, concurrency * rounds)


def default_model() -> str:
    from protoserve.server.demo_models import fetch_demo_models

    return str(fetch_demo_models().chat)


async def main_async(args: argparse.Namespace) -> int:
    # SIGTERM (a time limit, a CI cancel) unwinds like Ctrl-C: the servers' process groups are stopped.
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["settings"]["notes"] = [*result["settings"].get("notes", []), *args.note]
        print_table(result["results"], [int(c) for c in result["settings"]["concurrency"]])
        if args.write_readme:
            write_readme_outputs(result, result["results"], result["title"], args)
        return 0
    model_path = args.model or default_model()
    prompt = (PROMPT_WORD * max(1, args.prompt_words // len(PROMPT_WORD.split())))[: args.prompt_words * 8]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    starters = {
        name: starter
        for name, starter in (("transformers", start_transformers), ("protoserve", start_protoserve))
        if name in args.servers
    }
    report: dict[str, list[dict]] = {}
    if args.interleave:
        async with AsyncExitStack() as stack:
            targets: dict[str, Target] = {}
            for starter in starters.values():
                targets.update(await stack.enter_async_context(starter(model_path, args, prompt)))
            report.update(await measure_levels(targets, args))
    else:
        for starter in starters.values():
            async with starter(model_path, args, prompt) as targets:
                report.update(await measure_levels(targets, args))
    print_table(report, args.concurrency)
    title = f"{Path(model_path).name}, {args.output_len} output tokens, {args.device}, {os.cpu_count()} CPU cores"
    prompt_tokens = max((row["prompt_tokens"] or 0 for rows in report.values() for row in rows), default=0)
    result = {
        "title": title,
        "date": today(),
        "machine": describe_machine(),
        "settings": {
            "model": Path(model_path).name,
            "dtype": args.dtype,
            "device": args.device,
            "concurrency": args.concurrency,
            "output_len": args.output_len,
            "prompt_tokens": prompt_tokens or "?",
            "rounds": args.rounds,
            "min_requests": args.min_requests,
            "repeats": args.repeats,
            "interleave": args.interleave,
            "protoserve_flags": f"`{' '.join(protoserve_flags(args))}`" if protoserve_flags(args) else "",
            "transformers_version": transformers_version(args.ts_python) if "transformers/rest" in report else "",
            "notes": args.note,
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": report,
        "ratios": ratio_rows(report, args.concurrency),
    }
    (args.out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    plot(report, args.out_dir / "bench.png", title)
    print(f"\nwrote {args.out_dir / 'bench.json'} and {args.out_dir / 'bench.png'}")
    if args.write_readme:
        write_readme_outputs(result, report, title, args)
    return 0


@asynccontextmanager
async def start_transformers(
    model_path: str, args: argparse.Namespace, prompt: str
) -> AsyncIterator[dict[str, Target]]:
    """`transformers serve --continuous-batching` on the model, ready and warmed up, as one target."""
    port = free_port()
    command = [
        args.ts_python,
        "-m",
        "transformers.cli.transformers",
        "serve",
        model_path,
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
    ]
    server = ServerProcess("transformers/rest", command, f"http://127.0.0.1:{port}", args.out_dir / "transformers.log")
    try:
        await server.wait_ready(args.start_timeout)
        async with openai_driver(server, model_path, args, prompt) as one:
            yield {server.name: Target(one, server.memory)}
    finally:
        server.stop()


@asynccontextmanager
async def start_protoserve(model_path: str, args: argparse.Namespace, prompt: str) -> AsyncIterator[dict[str, Target]]:
    """`protoserve up` on the model, ready and warmed up: its REST (translator) and gRPC targets."""
    grpc_port, http_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "protoserve.client.cli.main",
        "up",
        "--model",
        model_path,
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        *protoserve_flags(args),
    ]
    server = ServerProcess("protoserve/rest", command, f"http://127.0.0.1:{http_port}", args.out_dir / "protoserve.log")
    try:
        await server.wait_ready(args.start_timeout)
        model_id = Path(model_path).name
        async with (
            openai_driver(server, model_id, args, prompt) as rest,
            grpc_driver(f"127.0.0.1:{grpc_port}", model_id, args, prompt) as grpc,
        ):
            yield {server.name: Target(rest, server.memory), "protoserve/grpc": Target(grpc, server.memory)}
    finally:
        server.stop()


def protoserve_flags(args: argparse.Namespace) -> list[str]:
    return ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []


def transformers_version(python: str) -> str:
    completed = subprocess.run(
        [python, "-c", "import transformers; print(transformers.__version__)"], capture_output=True, text=True
    )
    return completed.stdout.strip() or "(unknown version)"


def readme_target(settings: dict[str, Any], section: str | None) -> tuple[str, str]:
    """(section name, plot path in the repo) for --write-readme: the CPU run is `performance` with
    docs/bench-cpu.png; a run on another device gets its own section per model, after that one."""
    if section is None:
        if settings["device"] == "cpu":
            section = "performance"
        else:
            section = "performance-gpu-" + re.sub(r"[^a-z0-9]+", "-", str(settings["model"]).lower()).strip("-")
    image = (
        "docs/bench-cpu.png" if section == "performance" else f"docs/bench-{section.removeprefix('performance-')}.png"
    )
    return section, image


def write_readme_outputs(
    result: dict[str, Any], report: dict[str, list[dict]], title: str, args: argparse.Namespace
) -> None:
    """A performance section of the README and its plot (with the engine figures when --engine-json
    names them; for the CPU section, bench-results/bench_engine.json if present)."""
    section, image = readme_target(result["settings"], args.readme_section)
    engine_file = args.engine_json
    if engine_file is None and section == "performance":
        engine_file = ROOT / "bench-results" / "bench_engine.json"
    engine_result = json.loads(engine_file.read_text()) if engine_file and engine_file.exists() else None
    write_readme_section(ROOT / "README.md", readme_section(result, engine_result, image), section)
    (ROOT / "docs").mkdir(exist_ok=True)
    plot(report, ROOT / image, title)
    print(f"wrote the {section} section of {ROOT / 'README.md'} and {ROOT / image}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the demo chat model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompt-words", type=int, default=48, help="approximate prompt length in words")
    parser.add_argument("--output-len", type=int, default=64, help="tokens every request generates")
    parser.add_argument("--rounds", type=int, default=2, help="requests per level = concurrency x rounds")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument(
        "--servers", nargs="+", default=["transformers", "protoserve"], choices=["transformers", "protoserve"]
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ts-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--request-timeout", type=float, default=1800)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--rounds-at-64", type=int, default=0, help="rounds at 64+ streams (0: --rounds)")
    parser.add_argument("--torch-threads", type=int, help="passed to protoserve up --torch-threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each level per driver; rows are medians")
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep both servers up and let every driver take turns at each level (default: on for --device cpu; "
        "off elsewhere, where two servers would share one accelerator's memory)",
    )
    parser.add_argument("--from-json", type=Path, help="no runs: print (and --write-readme) a saved bench.json")
    parser.add_argument("--note", action="append", default=[], help="a line for the README section; repeatable")
    parser.add_argument(
        "--write-readme", action="store_true", help="render the results into README.md and a plot under docs/"
    )
    parser.add_argument(
        "--readme-section",
        help="README section to write (default: `performance` for a CPU run, else performance-gpu-<model>)",
    )
    parser.add_argument("--engine-json", type=Path, help="bench_engine.py result to add to the README section")
    args = parser.parse_args()
    if min(args.concurrency) < 1 or args.output_len < 1 or args.rounds < 1 or args.rounds_at_64 < 0:
        parser.error("--concurrency, --output-len and --rounds must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.interleave is None:
        args.interleave = args.device == "cpu"
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1")
    return args


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main_async(parse_args())))
