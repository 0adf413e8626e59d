"""Run under torchrun: load a model folder with transformers' tensor-parallel plan, report what each rank holds.

    torchrun --nproc-per-node 2 tests/deploy/tensor_parallel_probe.py MODEL_FOLDER REPORT_FOLDER

Each rank writes `rank-N.json`: the backend, its local shard shapes, the heads its attention sees,
and (rank 0) how far the sharded model's logits and greedy tokens are from the unsharded model's.
Not a test itself: `test_deploy_model_placement.py` launches it and reads the reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as distributed
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

PROMPT_IDS = [[5, 17, 42, 99, 3, 7]]
NEW_TOKENS = 6


def local_shape(tensor: Any) -> list[int]:
    """The shape this rank holds (a DTensor's local shard, or the plain tensor)."""
    return list(tensor.to_local().shape if hasattr(tensor, "to_local") else tensor.shape)


def main(model_folder: str, report_folder: str) -> None:
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_folder, dtype=torch.float32, distributed_config=DistributedConfig(tp_plan="auto")
    )
    rank = distributed.get_rank()
    attention = model.model.layers[0].self_attn
    seen_heads: list[int] = []

    def record_heads(_module: Any, _args: Any, kwargs: Any, output: Any) -> None:
        del _module, _args, kwargs
        seen_heads.append(int(output.shape[-1]) // attention.head_dim)

    hook = attention.q_proj.register_forward_hook(record_heads, with_kwargs=True)
    ids = torch.tensor(PROMPT_IDS)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    hook.remove()
    report: dict[str, Any] = {
        "rank": rank,
        "world_size": distributed.get_world_size(),
        "backend": distributed.get_backend(),
        "configured_heads": model.config.num_attention_heads,
        "heads_seen_by_attention": seen_heads[0],
        "q_proj_local_shape": local_shape(attention.q_proj.weight),
        "o_proj_local_shape": local_shape(attention.o_proj.weight),
    }
    if rank == 0:
        reference: Any = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
        with torch.no_grad():
            reference_logits = reference(ids).logits
            reference_tokens = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        full_logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
        report["max_logit_difference"] = float((full_logits - reference_logits).abs().max())
        report["greedy_tokens_equal"] = bool(torch.equal(tokens, reference_tokens))
    Path(report_folder, f"rank-{rank}.json").write_text(json.dumps(report))
    distributed.barrier()
    distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
