"""A model folder with random weights: a real model's config and tokenizer, another size if asked.

Speed does not depend on the weights' values, so a benchmark on a machine that cannot fetch a
model (an offline GPU box) can run on random weights of the right shape: the tokenizer, chat
template and generation config come from a small folder carried there (scripts/gpu_kit.sh), the
weights are drawn here with a fixed seed and saved as safetensors in the asked dtype.

Shapes:
- `same`: the source folder's own config (SmolLM2-135M from the demo chat model).
- `llama-1b`: a Llama decoder of about 1.07 B parameters with the source's vocabulary: hidden
  2048, 16 layers, 32 heads (8 key/value heads, head dim 64), MLP 8192, tied embeddings.
- `tiny`: 2 layers, hidden 64, for tests of this script and of the scripts that use it.

    python scripts/make_random_model.py --source ~/.cache/protoserve/models/smollm2-135m-instruct \\
        --shape llama-1b --dtype bfloat16 --device cuda --out /tmp/llama-1b-random
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

# Files that carry the tokenizer, the chat template and the generation defaults (no weights).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
SHAPES: dict[str, dict[str, Any]] = {
    "same": {},
    "llama-1b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
}
DTYPES = ("float32", "bfloat16", "float16")


def shaped_config(source: Path, shape: str) -> dict[str, Any]:
    """The source's config.json with the shape's sizes; no quantization, no pretrained weights."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {sorted(SHAPES)}")
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config.update(SHAPES[shape])
    return config


def make_random_model(source: Path, shape: str, dtype: str, out: Path, device: str = "cpu", seed: int = 0) -> int:
    """Write a model folder at `out`: the shaped config, random weights, the source's tokenizer
    files. Returns the number of parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
    out.mkdir(parents=True, exist_ok=True)
    config_dict = shaped_config(source, shape)
    config_dict["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    return sum(parameter.numel() for parameter in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with config.json and the tokenizer")
    parser.add_argument("--shape", default="same", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--device", default="cpu", help="where the weights are drawn (cuda is faster for 1 B)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    parameters = make_random_model(args.source, args.shape, args.dtype, args.out, args.device, args.seed)
    seconds = time.perf_counter() - started
    print(f"{args.out}: {args.shape}, {parameters / 1e6:.1f} M parameters, {args.dtype}, {seconds:.1f} s")


if __name__ == "__main__":
    main()
