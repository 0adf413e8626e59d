"""Loading model folders: what LoadedModel reports, bad options, and architectures the engine refuses."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from protoserve.server.engine.api import EngineConfig, EngineRequest
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.errors import ModelLoadError, UnsupportedModelError
from protoserve.server.engine.loader import LoadOptions, load_model
from protoserve.server.engine.model_runner import check_supported
from transformers import MambaConfig, MambaForCausalLM, Qwen2VLConfig, T5Config, WhisperConfig

from .engine_fixtures import EOS_TOKEN_ID, greedy, run_until_done


def test_loaded_model_describes_itself(tiny_folder: Path) -> None:
    loaded = load_model(LoadOptions(str(tiny_folder)))
    assert loaded.model_id == "tiny-llama"
    assert loaded.architecture == "LlamaForCausalLM"
    assert (loaded.dtype, loaded.device, loaded.quantization) == ("float32", "cpu", "none")
    assert loaded.modalities == ("text",) and loaded.processor is None
    assert loaded.context_length == 256
    assert loaded.eos_token_ids == frozenset({EOS_TOKEN_ID})
    assert loaded.created == int(tiny_folder.stat().st_mtime)


def test_explicit_dtype_and_8bit_quantization(tiny_folder: Path) -> None:
    assert load_model(LoadOptions(str(tiny_folder), dtype="bfloat16")).dtype == "bfloat16"
    quantized = load_model(LoadOptions(str(tiny_folder), quantization="8bit"))
    assert quantized.quantization == "bnb-8bit"
    engine = LLMEngine(quantized, EngineConfig(kv_cache_bytes=1 << 20, block_size=4))
    engine.add_request(EngineRequest("q", (3, 4, 5), greedy(3)))
    assert len(run_until_done(engine)["q"].token_ids[0]) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "float8"}, "unknown dtype"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda"}, "no CUDA device"),
        ({"quantization": "3bit"}, "unknown quantization"),
        ({"quantization": "4bit", "gguf_file": "model.gguf"}, "already quantized"),
        ({"gguf_file": "missing.gguf"}, "not found"),
    ],
)
def test_bad_options_are_refused(tiny_folder: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(LoadOptions(str(tiny_folder), **options))


def test_missing_models_are_refused(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(LoadOptions(str(tmp_path / "nowhere")))
    with pytest.raises(ModelLoadError, match="local hub cache"):
        load_model(LoadOptions("no-such-org/no-such-model"))
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(LoadOptions(str(tiny_folder / "config.json")))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1), "speech model"),
        (T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16), "encoder-decoder"),
    ],
)
def test_speech_and_encoder_decoder_models_are_refused(tmp_path: Path, config: object, message: str) -> None:
    config.save_pretrained(tmp_path)  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(LoadOptions(str(tmp_path)))


def test_state_space_and_3d_rope_models_are_refused() -> None:
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        check_supported(mamba)
    qwen2_vl = SimpleNamespace(config=Qwen2VLConfig(), _supports_attention_backend=True)
    with pytest.raises(UnsupportedModelError, match="3-D"):
        check_supported(qwen2_vl)  # type: ignore[arg-type]
