"""Benchmark the engine in-process against plain `model.generate`.

Drives `AsyncEngine` with N concurrent requests of the same prompt length that all generate
exactly `--output-len` tokens (ignore_eos), and reports output tok/s, time to first token and
inter-token latency (p50/p90); then runs `model.generate` on the same prompts one request at a
time and as one static batch, and prints the ratios.

    python scripts/bench_engine.py --concurrency 16 --prompt-len 32 --output-len 64
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from protoserve.server.engine import compute_threads
from protoserve.server.engine.api import EngineConfig, EngineRequest, SamplingParams
from protoserve.server.engine.async_engine import AsyncEngine
from protoserve.server.engine.loader import LoadedModel, LoadOptions, load_model

RESULT_FILE = Path(__file__).resolve().parent.parent / "bench-results" / "bench_engine.json"


@dataclass
class RequestTiming:
    start: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def make_prompts(loaded: LoadedModel, count: int, length: int) -> list[list[int]]:
    """Distinct prompts (no shared prefix, so the prefix cache does not flatter the engine)."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(len(loaded.tokenizer), loaded.model.get_input_embeddings().weight.shape[0])
    special = set(loaded.eos_token_ids) | set(getattr(loaded.tokenizer, "all_special_ids", []))
    prompts = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (length,), generator=generator).tolist()
        prompts.append([token for token in ids if token not in special][:length])
    return prompts


async def run_engine(loaded: LoadedModel, prompts: list[list[int]], output_len: int, config: EngineConfig) -> dict:
    engine = AsyncEngine(loaded, config)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    # Warm-up: one short request, so one-time costs are not counted.
    async for _ in engine.generate(
        EngineRequest("warmup", tuple(prompts[0][:8]), SamplingParams(temperature=0.0, max_tokens=2))
    ):
        pass
    timings: list[RequestTiming] = []

    async def one(index: int, prompt: list[int]) -> None:
        timing = RequestTiming(start=time.perf_counter())
        timings.append(timing)
        async for output in engine.generate(EngineRequest(f"bench{index}", tuple(prompt), params)):
            now = time.perf_counter()
            new_tokens = sum(len(delta.token_ids) for delta in output.deltas)
            if new_tokens and timing.first_token is None:
                timing.first_token = now
            if new_tokens:
                timing.token_times.append(now)
                timing.tokens += new_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(prompts)))
    elapsed = time.perf_counter() - started
    stats = engine.stats()
    await engine.shutdown()
    ttfts = [t.first_token - t.start for t in timings if t.first_token is not None]
    itls = [later - earlier for t in timings for earlier, later in zip(t.token_times, t.token_times[1:], strict=False)]
    total = sum(t.tokens for t in timings)
    return {
        "tokens": total,
        "seconds": elapsed,
        "tok_s": total / elapsed,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p90": percentile(ttfts, 0.9),
        "itl_p50": percentile(itls, 0.5),
        "itl_p90": percentile(itls, 0.9),
        "steps": stats.steps,
    }


def run_generate(model: Any, prompts: list[list[int]], output_len: int, batch: bool) -> dict:
    kwargs = {"max_new_tokens": output_len, "min_new_tokens": output_len, "do_sample": False, "pad_token_id": 0}
    started = time.perf_counter()
    total = 0
    with torch.inference_mode():
        groups = [prompts] if batch else [[prompt] for prompt in prompts]
        for group in groups:
            input_ids = torch.tensor(group, device=model.device)
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            total += (output.shape[1] - input_ids.shape[1]) * output.shape[0]
    elapsed = time.perf_counter() - started
    return {"tokens": total, "seconds": elapsed, "tok_s": total / elapsed}


def default_model_path() -> str:
    from protoserve.server.demo_models import fetch_demo_models

    return str(fetch_demo_models().chat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the demo chat model)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-baselines", action="store_true", help="run only the engine")
    parser.add_argument("--out", type=Path, default=RESULT_FILE, help="JSON result (read by bench.py --write-readme)")
    args = parser.parse_args()
    if args.concurrency < 1 or args.prompt_len < 1 or args.output_len < 1:
        parser.error("--concurrency, --prompt-len and --output-len must be at least 1")

    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    # As the server does: only the engine thread owns an OpenMP pool (compute_threads explains why).
    threads = compute_threads.reserve(args.threads)
    options = LoadOptions(args.model or default_model_path(), dtype=args.dtype, device=args.device)
    loaded = load_model(options)
    prompts = make_prompts(loaded, args.concurrency, args.prompt_len)
    config = EngineConfig(max_num_seqs=max(64, args.concurrency), max_num_batched_tokens=args.max_num_batched_tokens)
    print(
        f"model {loaded.model_id} ({loaded.architecture}, {loaded.dtype}, {loaded.device}), "
        f"{args.concurrency} requests x {args.prompt_len} prompt + {args.output_len} output tokens, "
        f"torch threads {threads}"
    )

    engine_result = asyncio.run(run_engine(loaded, prompts, args.output_len, config))
    print(
        f"engine:            {engine_result['tok_s']:8.1f} tok/s  ({engine_result['tokens']} tokens in "
        f"{engine_result['seconds']:.1f} s, {engine_result['steps']} steps)"
    )
    print(
        f"  TTFT p50 {engine_result['ttft_p50']:.3f} s  p90 {engine_result['ttft_p90']:.3f} s   "
        f"inter-token p50 {engine_result['itl_p50'] * 1000:.1f} ms  p90 {engine_result['itl_p90'] * 1000:.1f} ms"
    )
    summary = (
        f"{engine_result['tok_s']:.1f} output tok/s for {args.concurrency} concurrent requests x "
        f"{args.prompt_len} prompt + {args.output_len} output tokens ({loaded.dtype}, torch threads "
        f"{threads}), TTFT p50 {engine_result['ttft_p50']:.2f} s, inter-token p50 "
        f"{engine_result['itl_p50'] * 1000:.0f} ms"
    )
    baselines: dict[str, dict] = {}
    if not args.skip_baselines:
        torch.set_num_threads(threads)  # generate runs in this thread
        baselines = report_baselines(options, prompts, args.output_len, engine_result["tok_s"])
        summary += "; plain `model.generate` on the same prompts: " + ", ".join(
            f"{name} {result['tok_s']:.1f} tok/s" for name, result in baselines.items()
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                "settings": {k: str(v) for k, v in vars(args).items()},
                "engine": engine_result,
                "baselines": baselines,
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


def report_baselines(options: LoadOptions, prompts: list[list[int]], output_len: int, engine_tok_s: float) -> dict:
    """`model.generate` one request at a time and as one static batch, printed against the engine."""
    baseline_model = load_model(options).model
    one_by_one = run_generate(baseline_model, prompts, output_len, batch=False)
    static = run_generate(baseline_model, prompts, output_len, batch=True)
    print(
        f"generate 1-by-1:   {one_by_one['tok_s']:8.1f} tok/s  ({one_by_one['seconds']:.1f} s)   "
        f"engine x{engine_tok_s / one_by_one['tok_s']:.2f} (target >= 3)"
    )
    print(
        f"generate static:   {static['tok_s']:8.1f} tok/s  ({static['seconds']:.1f} s)   "
        f"engine x{engine_tok_s / static['tok_s']:.2f}"
    )
    return {"one request at a time": one_by_one, "one static batch": static}


if __name__ == "__main__":
    main()
