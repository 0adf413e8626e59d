"""protoserve against `transformers serve --continuous-batching`, side by side, on one machine.

Starts each server on the same model folder, warms it, and drives it with the same closed-loop
streamed load through the OpenAI API at each concurrency (greedy, every request forced to
exactly --output-len tokens). protoserve is also driven through its gRPC API directly, so the
translator's overhead shows as its own ratio. Prints one table, writes a JSON file and a PNG plot.

    python scripts/bench.py                      # demo chat model, concurrency 1 4 16 64
    python scripts/bench.py --concurrency 1 16 --output-len 64 --servers protoserve

`transformers serve` runs from --ts-python (default `.venv-bench/bin/python`, made with
`python3.11 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 'transformers[serving]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import describe, grpc_chat_stream, openai_chat_stream, run_closed_loop  # noqa: E402

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
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree if p.is_running())
            except psutil.Error:
                continue
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
                    async with session.get(f"{self.base_url}/v1/models") as response:
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


async def drive_openai(server: ServerProcess, model: str, args: argparse.Namespace, prompt: str) -> list[dict]:
    results = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        body = chat_body(model, prompt, args.output_len, server.name.split("/")[0])

        async def one() -> object:
            return await openai_chat_stream(session, server.base_url, body, args.output_len)

        await run_closed_loop(one, concurrency=2, num_requests=2)  # warm-up
        for concurrency in args.concurrency:
            server.memory.reset()
            result = await run_closed_loop(one, concurrency, requests_for(concurrency, args))
            print(f"{server.name:<22} {describe(result)}", flush=True)
            results.append({**result.as_dict(), "peak_rss_mib": server.memory.peak_mib})
    return results


async def drive_grpc(target: str, memory: PeakMemory, model: str, args: argparse.Namespace, prompt: str) -> list[dict]:
    from protoserve.client.channel import create_async_channel
    from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

    results = []
    async with create_async_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.ChatRequest(
            model=model,
            messages=[generation_pb2.ChatMessage(role="user", content=[generation_pb2.ContentPart(text=prompt)])],
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=args.output_len, min_tokens=args.output_len),
        )

        async def one() -> object:
            return await grpc_chat_stream(stub, request, args.output_len)

        await run_closed_loop(one, concurrency=2, num_requests=2)
        for concurrency in args.concurrency:
            memory.reset()
            result = await run_closed_loop(one, concurrency, requests_for(concurrency, args))
            print(f"{'protoserve/grpc':<22} {describe(result)}", flush=True)
            results.append({**result.as_dict(), "peak_rss_mib": memory.peak_mib})
    return results


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.min_requests, concurrency * args.rounds)


def print_table(report: dict[str, list[dict]], concurrencies: list[int]) -> None:
    header = (
        f"{'server':<22}{'conc':>5}{'tok/s':>9}{'req/s':>8}{'TTFT p50':>10}{'TTFT p90':>10}"
        f"{'ITL p50':>9}{'ITL p90':>9}{'RSS MiB':>9}{'err':>5}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, rows in report.items():
        for row in rows:
            print(
                f"{name:<22}{row['concurrency']:>5}{row['output_tokens_per_s']:>9.1f}{row['requests_per_s']:>8.2f}"
                f"{row['ttft_p50_s']:>10.3f}{row['ttft_p90_s']:>10.3f}{row['itl_p50_s'] * 1e3:>8.1f}m"
                f"{row['itl_p90_s'] * 1e3:>8.1f}m{row['peak_rss_mib']:>9.0f}{row['errors']:>5}"
            )
    ratios = ratio_rows(report, concurrencies)
    if ratios:
        print("\nratios (protoserve / transformers serve, REST; translator = REST / gRPC)")
        for row in ratios:
            print("  " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def ratio_rows(report: dict[str, list[dict]], concurrencies: list[int]) -> list[dict[str, object]]:
    rows = []
    for index, concurrency in enumerate(concurrencies):
        row: dict[str, object] = {"concurrency": concurrency}
        rest = report.get("protoserve/rest", [])
        ts = report.get("transformers/rest", [])
        grpc = report.get("protoserve/grpc", [])
        if rest and ts:
            row["throughput_x"] = rest[index]["output_tokens_per_s"] / max(ts[index]["output_tokens_per_s"], 1e-9)
            row["ttft_p50_fraction"] = rest[index]["ttft_p50_s"] / max(ts[index]["ttft_p50_s"], 1e-9)
        if rest and grpc:
            row["translator_efficiency"] = rest[index]["output_tokens_per_s"] / max(
                grpc[index]["output_tokens_per_s"], 1e-9
            )
        if len(row) > 1:
            rows.append(row)
    return rows


def plot(report: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in report.items():
        xs = [r["concurrency"] for r in rows]
        throughput.plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", label=name)
        ttft.plot(xs, [r["ttft_p50_s"] for r in rows], marker="o", label=name)
    for axis, label in ((throughput, "output tokens/s"), (ttft, "TTFT p50 (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def default_model() -> str:
    from protoserve.server.demo_models import fetch_demo_models

    return str(fetch_demo_models().chat)


async def main_async(args: argparse.Namespace) -> int:
    model_path = args.model or default_model()
    prompt = (PROMPT_WORD * max(1, args.prompt_words // len(PROMPT_WORD.split())))[: args.prompt_words * 8]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, list[dict]] = {}
    if "transformers" in args.servers:
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
        server = ServerProcess(
            "transformers/rest", command, f"http://127.0.0.1:{port}", args.out_dir / "transformers.log"
        )
        try:
            await server.wait_ready(args.start_timeout)
            report["transformers/rest"] = await drive_openai(server, model_path, args, prompt)
        finally:
            server.stop()
    if "protoserve" in args.servers:
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
        ]
        server = ServerProcess(
            "protoserve/rest", command, f"http://127.0.0.1:{http_port}", args.out_dir / "protoserve.log"
        )
        try:
            await server.wait_ready(args.start_timeout)
            model_id = Path(model_path).name
            report["protoserve/rest"] = await drive_openai(server, model_id, args, prompt)
            report["protoserve/grpc"] = await drive_grpc(
                f"127.0.0.1:{grpc_port}", server.memory, model_id, args, prompt
            )
        finally:
            server.stop()
    print_table(report, args.concurrency)
    title = f"{Path(model_path).name}, {args.output_len} output tokens, {args.device}, {os.cpu_count()} CPU cores"
    result = {
        "title": title,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": report,
        "ratios": ratio_rows(report, args.concurrency),
    }
    (args.out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    plot(report, args.out_dir / "bench.png", title)
    print(f"\nwrote {args.out_dir / 'bench.json'} and {args.out_dir / 'bench.png'}")
    return 0


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
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main_async(parse_args())))
