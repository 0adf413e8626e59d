"""Broken model folders are ModelLoadErrors naming the reason; weights that leave tensors random are
refused; --quantization loads on the asked device; speech and encoder-only models are refused clearly."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers
from protoserve.server.engine import loader
from protoserve.server.engine.errors import ModelLoadError, UnsupportedModelError
from protoserve.server.engine.loader import LoadOptions, load_model, missing_weights
from protoserve.server.engine.model_runner import check_supported
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
    Wav2Vec2Config,
)

from .engine_fixtures import build_model, tiny_llama_config, word_tokenizer

SMALL = {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
SMALL_ENCODER = {**SMALL, "intermediate_size": 64, "max_position_embeddings": 64}


def broken_copy(tiny_folder: Path, tmp_path: Path, change: Callable[[Path], None]) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder, folder)
    change(folder)
    return folder


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def lfs_pointer(folder: Path) -> None:
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1048576\n"
    )


def garbage_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)


def no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def missing_shard(folder: Path) -> None:
    build_model(tiny_llama_config()).save_pretrained(folder, max_shard_size="20KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    sorted(folder.glob("model-*.safetensors"))[1].unlink()


def no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def other_hidden_size(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (truncate_weights, r"the weights in .*broken could not be loaded \(SafetensorError: "),
        (lfs_pointer, r"the weights in .*broken could not be loaded \(SafetensorError: "),
        (garbage_header, r"the weights in .*broken could not be loaded \(SafetensorError: "),
        (no_weights, r"the weights in .*broken could not be loaded \(OSError: .*model\.safetensors"),
        (missing_shard, r"the weights in .*broken could not be loaded \(FileNotFoundError: .*model-00002-of-"),
        (no_tokenizer, r"the tokenizer in .*broken could not be loaded \(ValueError: .*tokenizer files"),
        (other_hidden_size, r"could not be loaded \(RuntimeError: .*the shapes of its tensors do not fit config"),
    ],
)
def test_broken_folders_are_load_errors_that_say_why(
    tiny_folder: Path, tmp_path: Path, change: Callable[[Path], None], message: str
) -> None:
    folder = broken_copy(tiny_folder, tmp_path, change)
    with pytest.raises(ModelLoadError, match=message) as raised:
        load_model(LoadOptions(str(folder)))
    assert "\n" not in str(raised.value)


def test_a_failed_load_keeps_the_traceback_in_the_log(
    tiny_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = broken_copy(tiny_folder, tmp_path, truncate_weights)
    with caplog.at_level(logging.WARNING, logger=loader.__name__), pytest.raises(ModelLoadError):
        load_model(LoadOptions(str(folder)))
    [record] = [record for record in caplog.records if record.name == loader.__name__]
    assert record.exc_info is not None and "could not be loaded" in record.getMessage()


def rewrite_weights(folder: Path, rename: Callable[[str], str | None]) -> None:
    """Rename each tensor of the folder's safetensors (None drops it)."""
    tensors = load_file(folder / "model.safetensors")
    kept = {new: tensor for key, tensor in tensors.items() if (new := rename(key)) is not None}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


def test_weights_under_other_names_are_refused(tiny_folder: Path, tmp_path: Path) -> None:
    folder = broken_copy(tiny_folder, tmp_path, lambda folder: rewrite_weights(folder, lambda key: "old." + key))
    with pytest.raises(ModelLoadError, match=r"21 of the model's tensors are missing .*lm_head\.weight, .*, \.\.\.\)"):
        load_model(LoadOptions(str(folder)))


def test_weights_missing_a_layer_are_refused(tiny_folder: Path, tmp_path: Path) -> None:
    def drop_layer_1(folder: Path) -> None:
        rewrite_weights(folder, lambda key: None if ".layers.1." in key else key)

    folder = broken_copy(tiny_folder, tmp_path, drop_layer_1)
    with pytest.raises(ModelLoadError, match=r"9 of the model's tensors are missing .*layers\.1\.input_layernorm"):
        load_model(LoadOptions(str(folder)))


def test_extra_tensors_in_the_checkpoint_are_not_a_reason_to_refuse(tiny_folder: Path, tmp_path: Path) -> None:
    def add_extra(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = tensors["model.norm.weight"].clone()
        tensors["model.unused_buffer"] = tensors["model.norm.weight"].clone()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    folder = broken_copy(tiny_folder, tmp_path, add_extra)
    assert load_model(LoadOptions(str(folder))).architecture == "LlamaForCausalLM"


def test_tied_embeddings_saved_without_the_head_load(tmp_path: Path) -> None:
    folder = tmp_path / "tied"
    build_model(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    loaded = load_model(LoadOptions(str(folder)))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_missing_weights_leaves_out_tied_optional_and_buffer_keys() -> None:
    model = build_model(tiny_llama_config())
    model.all_tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    model._keys_to_ignore_on_load_missing = {r"layers\.1\.mlp"}
    reported = {
        "lm_head.weight",  # tied
        "model.layers.1.mlp.up_proj.weight",  # optional for this model
        "model.rotary_emb.inv_freq",  # a buffer
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    }
    info = {"missing_keys": reported, "unexpected_keys": {"anything"}}
    assert missing_weights(model, info) == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    assert missing_weights(model, {"missing_keys": set(), "unexpected_keys": {"x"}}) == []


@pytest.mark.parametrize("quantization", ["8bit", "4bit", None])
def test_quantized_loads_are_placed_on_the_asked_device(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, quantization: str | None
) -> None:
    """Without a device_map, bitsandbytes puts the model on cuda:0 whenever CUDA is available; an
    unquantized model is moved after loading and gets none."""
    seen: dict[str, Any] = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(folder: Path, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(folder, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loaded = load_model(LoadOptions(str(tiny_folder), device="cpu", quantization=quantization))
    assert seen.get("device_map") == ({"": "cpu"} if quantization else None)
    assert (loaded.device, loaded.quantization) == ("cpu", f"bnb-{quantization}" if quantization else "none")


def test_speech_models_other_than_whisper_are_refused_truthfully(tmp_path: Path) -> None:
    Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(UnsupportedModelError, match="only speech models served are whisper") as raised:
        load_model(LoadOptions(str(tmp_path)))
    assert "transcription service" not in str(raised.value)


def test_a_masked_lm_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bert"
    BertForMaskedLM(BertConfig(**SMALL_ENCODER)).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match=r"BertLMHeadModel attends in both directions"):
        load_model(LoadOptions(str(folder)))


@pytest.mark.parametrize(
    "config",
    [BertConfig(**SMALL_ENCODER), RobertaConfig(**SMALL_ENCODER, pad_token_id=1)],
    ids=["bert", "roberta"],
)
def test_encoder_only_models_are_refused(config: Any) -> None:
    model = AutoModelForCausalLM.from_config(config)  # BertLMHeadModel / RobertaForCausalLM, is_decoder False
    with pytest.raises(UnsupportedModelError, match="both directions"):
        check_supported(model)


@pytest.mark.parametrize(
    "config",
    [
        tiny_llama_config(),
        Qwen2Config(**SMALL, intermediate_size=64),
        MistralConfig(**SMALL, intermediate_size=64),
        BertConfig(**SMALL_ENCODER, is_decoder=True),  # a BERT trained as a causal decoder attends causally
    ],
    ids=["llama", "qwen2", "mistral", "bert-decoder"],
)
def test_causal_decoders_are_accepted(config: Any) -> None:
    check_supported(AutoModelForCausalLM.from_config(config))
