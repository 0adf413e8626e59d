"""CTranslate2 -> transformers Whisper name mapping, on a tiny random model exported here in CT2 layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from protoserve.server.demo_models import DemoModelFetchError
from protoserve.server.demo_models.ctranslate2_reader import CTranslate2Model
from protoserve.server.demo_models.whisper_model import count_layers, load_weights, whisper_state_dict
from transformers import WhisperConfig, WhisperForConditionalGeneration

TINY = WhisperConfig(
    vocab_size=120,
    num_mel_bins=8,
    d_model=16,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=24,
    decoder_ffn_dim=24,
    max_source_positions=10,
    max_target_positions=12,
    pad_token_id=100,
    bos_token_id=101,
    eos_token_id=100,
    decoder_start_token_id=101,
)


def as_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy().astype(np.float16)


def export_to_ctranslate2_layout(model: WhisperForConditionalGeneration) -> CTranslate2Model:
    """The inverse of the mapping under test, written from the table in docs/test-models.md."""
    state = model.state_dict()
    variables: dict[str, np.ndarray] = {}

    def put_linear(target: str, source: str) -> None:
        variables[f"{target}/weight"] = as_array(state[f"{source}.weight"])
        variables[f"{target}/bias"] = as_array(state[f"{source}.bias"])

    def put_norm(target: str, source: str) -> None:
        variables[f"{target}/gamma"] = as_array(state[f"{source}.weight"])
        variables[f"{target}/beta"] = as_array(state[f"{source}.bias"])

    def put_fused(target: str, sources: list[str]) -> None:
        variables[f"{target}/weight"] = as_array(torch.cat([state[f"{s}.weight"] for s in sources]))
        biases = [state[f"{s}.bias"] if f"{s}.bias" in state else torch.zeros(TINY.d_model) for s in sources]
        variables[f"{target}/bias"] = as_array(torch.cat(biases))

    for stack, layer_count in (("encoder", TINY.encoder_layers), ("decoder", TINY.decoder_layers)):
        prefix = f"model.{stack}"
        variables[f"{stack}/position_encodings/encodings"] = as_array(state[f"{prefix}.embed_positions.weight"])
        variables[f"{stack}/num_heads"] = np.array(2, dtype="<i2")
        put_norm(f"{stack}/layer_norm", f"{prefix}.layer_norm")
        for index in range(layer_count):
            target, source = f"{stack}/layer_{index}", f"{prefix}.layers.{index}"
            put_fused(f"{target}/self_attention/linear_0", [f"{source}.self_attn.{p}_proj" for p in "qkv"])
            put_linear(f"{target}/self_attention/linear_1", f"{source}.self_attn.out_proj")
            put_norm(f"{target}/self_attention/layer_norm", f"{source}.self_attn_layer_norm")
            if stack == "decoder":
                put_linear(f"{target}/attention/linear_0", f"{source}.encoder_attn.q_proj")
                put_fused(f"{target}/attention/linear_1", [f"{source}.encoder_attn.{p}_proj" for p in "kv"])
                put_linear(f"{target}/attention/linear_2", f"{source}.encoder_attn.out_proj")
                put_norm(f"{target}/attention/layer_norm", f"{source}.encoder_attn_layer_norm")
            put_linear(f"{target}/ffn/linear_0", f"{source}.fc1")
            put_linear(f"{target}/ffn/linear_1", f"{source}.fc2")
            put_norm(f"{target}/ffn/layer_norm", f"{source}.final_layer_norm")
    put_linear("encoder/conv1", "model.encoder.conv1")
    put_linear("encoder/conv2", "model.encoder.conv2")
    variables["decoder/embeddings/weight"] = as_array(state["model.decoder.embed_tokens.weight"])
    variables["decoder/activation"] = np.array(3, dtype="i1")
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    return CTranslate2Model(6, "WhisperSpec", 3, variables, aliases)


@pytest.fixture
def tiny_model() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(TINY)
    with torch.no_grad():  # round through float16 so the comparison below is exact
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


def test_mapping_reproduces_every_weight(tiny_model: WhisperForConditionalGeneration) -> None:
    exported = export_to_ctranslate2_layout(tiny_model)
    assert (count_layers(exported, "encoder"), count_layers(exported, "decoder")) == (2, 3)
    fresh = WhisperForConditionalGeneration(TINY)
    load_weights(fresh, whisper_state_dict(exported))
    expected, actual = tiny_model.state_dict(), fresh.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    features = torch.randn(1, TINY.num_mel_bins, 2 * TINY.max_source_positions)
    decoder_input_ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(
            fresh(features, decoder_input_ids=decoder_input_ids).logits,
            tiny_model(features, decoder_input_ids=decoder_input_ids).logits,
        )


def test_unmapped_weight_is_an_error(tiny_model: WhisperForConditionalGeneration) -> None:
    exported = export_to_ctranslate2_layout(tiny_model)
    exported.variables["decoder/mystery/weight"] = np.zeros(3, dtype=np.float16)
    with pytest.raises(DemoModelFetchError, match="decoder/mystery/weight"):
        whisper_state_dict(exported)


def test_missing_weight_is_an_error(tiny_model: WhisperForConditionalGeneration) -> None:
    exported = export_to_ctranslate2_layout(tiny_model)
    del exported.variables["decoder/layer_2/ffn/linear_1/bias"]
    with pytest.raises(KeyError, match="decoder/layer_2/ffn/linear_1/bias"):
        whisper_state_dict(exported)


def test_weights_for_another_size_are_rejected(tiny_model: WhisperForConditionalGeneration) -> None:
    state = whisper_state_dict(export_to_ctranslate2_layout(tiny_model))
    smaller = WhisperForConditionalGeneration(WhisperConfig(**{**TINY.to_dict(), "decoder_layers": 2}))
    with pytest.raises(DemoModelFetchError, match="unexpected"):
        load_weights(smaller, state)
    state["model.encoder.conv1.weight"] = np.zeros((16, 8, 5), dtype=np.float16)
    with pytest.raises(DemoModelFetchError, match="do not fit"):
        load_weights(WhisperForConditionalGeneration(TINY), state)


def test_gaps_in_layer_numbers_are_an_error(tiny_model: WhisperForConditionalGeneration) -> None:
    exported = export_to_ctranslate2_layout(tiny_model)
    for name in [name for name in exported.variables if name.startswith("decoder/layer_1/")]:
        del exported.variables[name]
    with pytest.raises(DemoModelFetchError, match="not numbered"):
        count_layers(exported, "decoder")
