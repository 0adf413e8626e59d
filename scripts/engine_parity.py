"""Greedy output of the engine under a mixed batch against plain `model.generate`, on any device.

The engine's first proof (tests/engine) runs on the CPU; this script is the same check for a
machine the test suite never sees, such as a CUDA box: prompts of different lengths go through
`AsyncEngine` all at once (chunked prefills mixed with decodes), and each one's tokens are
compared with `model.generate` on that prompt alone. Both stop at the model's EOS.

On a GPU the two paths multiply in different orders (other kernels for other batch sizes), so an
argmax may flip where generate's top two logits are within rounding of each other. A prompt whose
first differing token is at such a near-tie (top-two gap < --tie-margin, taken from generate's
own scores) is reported as a near-tie; any other difference is a mismatch and the exit status is 1.
TF32 is turned off, so float32 compares float32.

    python scripts/engine_parity.py --device cuda --dtype float32 --out parity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from protoserve.server.engine.api import EngineConfig, EngineRequest, SamplingParams
from protoserve.server.engine.async_engine import AsyncEngine
from protoserve.server.engine.loader import LoadedModel, LoadOptions, load_model

# Default near-tie margins by dtype: float32 rounding is ~1e-6 relative, bfloat16's ~4e-3.
DEFAULT_TIE_MARGINS = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


@dataclass
class PromptResult:
    """One prompt's comparison: `status` is "equal", "near-tie" or "mismatch"."""

    prompt_tokens: int
    reference_tokens: int
    engine_tokens: int
    status: str
    first_difference: int | None = None
    reference_gap: float | None = None  # generate's top-1 minus top-2 logit at the first difference


def make_prompts(loaded: LoadedModel, lengths: list[int], seed: int) -> list[list[int]]:
    """Random token prompts of the given lengths, free of special tokens."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(len(loaded.tokenizer), loaded.model.get_input_embeddings().weight.shape[0])
    special = set(loaded.eos_token_ids) | set(getattr(loaded.tokenizer, "all_special_ids", []))
    prompts = []
    for length in lengths:
        ids = torch.randint(min(1000, vocab // 2), vocab, (length * 2,), generator=generator).tolist()
        prompts.append([token for token in ids if token not in special][:length])
    return prompts


def reference(loaded: LoadedModel, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """generate's greedy tokens for `prompt` alone and, per step, its top-1 minus top-2 logit."""
    model = loaded.model
    input_ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=sorted(loaded.eos_token_ids),
            pad_token_id=loaded.tokenizer.pad_token_id or 0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = generated.sequences[0, len(prompt) :].tolist()
    gaps = []
    for logits in generated.logits:
        top = torch.topk(logits[0].float(), 2).values
        gaps.append(float(top[0] - top[1]))
    return tokens, gaps


async def engine_outputs(
    loaded: LoadedModel, prompts: list[list[int]], max_tokens: int, config: EngineConfig
) -> list[list[int]]:
    """Every prompt through one AsyncEngine at once; each one's generated tokens."""
    engine = AsyncEngine(loaded, config)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    async def one(index: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for output in engine.generate(EngineRequest(f"parity{index}", tuple(prompt), params)):
            for delta in output.deltas:
                tokens.extend(delta.token_ids)
        return tokens

    try:
        return list(await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(prompts))))
    finally:
        await engine.shutdown()


def compare(
    prompt: list[int], expected: list[int], gaps: list[float], actual: list[int], tie_margin: float
) -> PromptResult:
    """Classify one prompt's engine tokens against generate's."""
    result = PromptResult(len(prompt), len(expected), len(actual), "equal")
    if actual == expected:
        return result
    first = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), None)
    if first is None:  # one is a prefix of the other: a stop at EOS or the length differs
        result.status, result.first_difference = "mismatch", min(len(expected), len(actual))
        return result
    result.first_difference = first
    result.reference_gap = gaps[first] if first < len(gaps) else None
    near_tie = result.reference_gap is not None and result.reference_gap < tie_margin
    result.status = "near-tie" if near_tie else "mismatch"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the demo chat model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[5, 17, 33, 60, 8, 90, 3, 41])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=64, help="small: prefills come in chunks")
    parser.add_argument("--tie-margin", type=float, help="near-tie gap (default by dtype)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report")
    args = parser.parse_args()
    if min(args.prompt_lengths) < 1 or args.max_tokens < 1:
        parser.error("--prompt-lengths and --max-tokens must be at least 1")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.model is None:
        from protoserve.server.demo_models import fetch_demo_models

        args.model = str(fetch_demo_models().chat)
    loaded = load_model(LoadOptions(args.model, dtype=args.dtype, device=args.device))
    tie_margin = args.tie_margin if args.tie_margin is not None else DEFAULT_TIE_MARGINS.get(loaded.dtype, 0.25)
    prompts = make_prompts(loaded, args.prompt_lengths, args.seed)
    # generate first: the engine then switches the model to its paged attention.
    references = [reference(loaded, prompt, args.max_tokens) for prompt in prompts]
    config = EngineConfig(max_num_seqs=max(8, len(prompts)), max_num_batched_tokens=args.max_num_batched_tokens)
    actual = asyncio.run(engine_outputs(loaded, prompts, args.max_tokens, config))
    results = [
        compare(prompt, expected, gaps, tokens, tie_margin)
        for prompt, (expected, gaps), tokens in zip(prompts, references, actual, strict=True)
    ]
    counts = {status: sum(r.status == status for r in results) for status in ("equal", "near-tie", "mismatch")}
    report: dict[str, Any] = {
        "model": Path(args.model).name,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "device_name": torch.cuda.get_device_name(0) if loaded.device.startswith("cuda") else "cpu",
        "tie_margin": tie_margin,
        "counts": counts,
        "prompts": [asdict(r) for r in results],
    }
    print(
        f"{report['model']} on {report['device_name']} ({loaded.dtype}): {len(prompts)} prompts in one batch, "
        f"{counts['equal']} equal to generate, {counts['near-tie']} differ at a near-tie (< {tie_margin}), "
        f"{counts['mismatch']} mismatch"
    )
    for index, result in enumerate(results):
        if result.status != "equal":
            print(f"  prompt {index}: {result.status} at token {result.first_difference}, gap {result.reference_gap}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 1 if counts["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
