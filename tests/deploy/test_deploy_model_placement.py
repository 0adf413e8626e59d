"""Models larger than one device: what is supported, and a clear refusal of what is not.

Supported: one model per process on one device, made smaller with 4-bit or 8-bit weights, and many
such processes as replicas. Not supported: tensor or pipeline parallelism inside protoserve's engine.
transformers 5.23 itself does shard a Llama with `tp_plan="auto"` under torchrun, on CPU with gloo
too; the test below pins that fact and shows why the engine cannot take such a model as it is: each
rank's attention sees only its share of the heads, while the engine's paged KV cache holds all of
them on one device.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from protoserve.server.cli import add_serve_arguments, run_serve
from protoserve.server.config import ConfigError, check_single_process_launch

from deploy.processes import ROOT, VENV_BIN, build_tiny_chat_model, child_environment, free_port

TENSOR_PARALLEL_RANKS = 2


def serve_arguments(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(flags))


@pytest.mark.parametrize("world_size", ["2", "8"])
def test_serve_refuses_a_torchrun_launch_with_advice(
    world_size: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    status = run_serve(serve_arguments("--model", str(tmp_path), "--port", "0", "--unix-socket", "unused.sock"))
    error = capsys.readouterr().err
    assert status == 2
    assert f"WORLD_SIZE={world_size}" in error
    assert "tensor and pipeline parallelism are not supported" in error
    assert "--quantization" in error and "docs/deploying.md" in error


@pytest.mark.parametrize(
    ("environment", "refused"),
    [
        ({}, False),
        ({"WORLD_SIZE": ""}, False),
        ({"WORLD_SIZE": "1"}, False),
        ({"WORLD_SIZE": "2"}, True),
        ({"WORLD_SIZE": "two"}, True),
        ({"WORLD_SIZE": "0"}, True),
    ],
)
def test_only_a_single_process_launch_is_accepted(environment: dict[str, str], refused: bool) -> None:
    if refused:
        with pytest.raises(ConfigError, match="WORLD_SIZE"):
            check_single_process_launch(environment)
    else:
        check_single_process_launch(environment)


def test_quantized_loading_shrinks_the_weights_of_one_device(tmp_path: Path) -> None:
    """The supported route for a model too large for one device: `--quantization 8bit/4bit`."""
    from protoserve.server.engine.loader import LoadOptions, load_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = build_tiny_chat_model(tmp_path / "tiny")
    wider = LlamaConfig.from_pretrained(folder)
    wider.hidden_size, wider.intermediate_size, wider.num_hidden_layers = 256, 512, 4
    LlamaForCausalLM(wider).save_pretrained(folder)  # linear layers dominate, as in real models
    footprint = {
        quantization: load_model(
            LoadOptions(str(folder), device="cpu", quantization=quantization)
        ).model.get_memory_footprint()
        for quantization in (None, "8bit", "4bit")
    }
    assert footprint["8bit"] < footprint[None] / 3
    assert footprint["4bit"] < footprint["8bit"] * 0.7


def test_transformers_shards_a_llama_across_torchrun_ranks_on_cpu(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(VENV_BIN))
    assert torchrun is not None, "torch ships torchrun"
    folder = build_tiny_chat_model(tmp_path / "tiny")
    reports = tmp_path / "reports"
    reports.mkdir()
    command = [
        torchrun,
        f"--nproc-per-node={TENSOR_PARALLEL_RANKS}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(ROOT / "tests" / "deploy" / "tensor_parallel_probe.py"),
        str(folder),
        str(reports),
    ]
    environment = child_environment({"GLOO_SOCKET_IFNAME": "lo"})
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((reports / f"rank-{rank}.json").read_text()) for rank in range(TENSOR_PARALLEL_RANKS)]
    for report in ranks:
        assert (report["backend"], report["world_size"]) == ("gloo", TENSOR_PARALLEL_RANKS)
        # Column-parallel q_proj, row-parallel o_proj: each rank holds half the heads.
        assert report["q_proj_local_shape"] == [64 // TENSOR_PARALLEL_RANKS, 64]
        assert report["o_proj_local_shape"] == [64, 64 // TENSOR_PARALLEL_RANKS]
        assert report["heads_seen_by_attention"] == report["configured_heads"] // TENSOR_PARALLEL_RANKS
    assert ranks[0]["max_logit_difference"] < 1e-4
    assert ranks[0]["greedy_tokens_equal"] is True
