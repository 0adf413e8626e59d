"""Convert a CTranslate2 (faster-whisper) Whisper export into a transformers Whisper folder.

Input folder: `model.bin`, `config.json` (suppress ids, alignment heads) and `tokenizer.json`.
Output: `WhisperForConditionalGeneration` weights, a `WhisperProcessor` (feature extractor and a
tokenizer that knows the special and timestamp tokens) and a generation config under which
`generate(input_features)` transcribes without timestamps, and with `return_timestamps=True` with them.
Sizes and token ids are read from the files, so tiny.en and the multilingual models share this code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from protoserve.server.demo_models.ctranslate2_reader import CTranslate2Model, read_ctranslate2_model
from protoserve.server.demo_models.errors import DemoModelFetchError
from protoserve.server.demo_models.saved_folder import drop_runtime_tokenizer_settings, set_default_load_dtype

if TYPE_CHECKING:
    import torch
    from transformers import WhisperConfig, WhisperProcessor

TIMESTAMP_COUNT = 1501  # <|0.00|> ... <|30.00|> in steps of 0.02 s
SAMPLING_RATE = 16000
# CTranslate2 scalars that describe the architecture and have no weight counterpart in transformers.
SCALAR_VARIABLES = frozenset(
    {
        "activation",
        "alibi",
        "alignment_heads",
        "alignment_layer",
        "num_heads",
        "pre_norm",
        "scale_embeddings",
        "start_from_zero_embedding",
    }
)


def count_layers(model: CTranslate2Model, stack: str) -> int:
    """Number of `stack/layer_N` blocks (stack is 'encoder' or 'decoder')."""
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(match.group(1)) for name in model.variables if (match := pattern.match(name))}
    if indices != set(range(len(indices))) or not indices:
        raise DemoModelFetchError(f"CTranslate2 {stack} layers are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def whisper_state_dict(model: CTranslate2Model) -> dict[str, np.ndarray]:
    """Map every CTranslate2 weight onto its transformers name (prefix `model.`, plus `proj_out.weight`).

    Fused projections are split; the k part of fused biases (stored as zeros) is dropped because
    transformers' k_proj has no bias. Raises when a non-scalar variable is left unmapped.
    """
    state: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(model.aliases.get(name, name))
        return model.get(name)

    def linear(source: str, target: str) -> None:
        state[f"{target}.weight"] = take(f"{source}/weight")
        state[f"{target}.bias"] = take(f"{source}/bias")

    def layer_norm(source: str, target: str) -> None:
        state[f"{target}.weight"] = take(f"{source}/gamma")
        state[f"{target}.bias"] = take(f"{source}/beta")

    def split_linear(source: str, targets: list[str]) -> None:
        weights = np.split(take(f"{source}/weight"), len(targets), axis=0)
        biases = np.split(take(f"{source}/bias"), len(targets), axis=0)
        for target, weight, bias in zip(targets, weights, biases, strict=True):
            state[f"{target}.weight"] = weight
            if not target.endswith("k_proj"):
                state[f"{target}.bias"] = bias

    for stack in ("encoder", "decoder"):
        prefix = f"model.{stack}"
        state[f"{prefix}.embed_positions.weight"] = take(f"{stack}/position_encodings/encodings")
        layer_norm(f"{stack}/layer_norm", f"{prefix}.layer_norm")
        for index in range(count_layers(model, stack)):
            source, target = f"{stack}/layer_{index}", f"{prefix}.layers.{index}"
            split_linear(f"{source}/self_attention/linear_0", [f"{target}.self_attn.{p}_proj" for p in "qkv"])
            linear(f"{source}/self_attention/linear_1", f"{target}.self_attn.out_proj")
            layer_norm(f"{source}/self_attention/layer_norm", f"{target}.self_attn_layer_norm")
            if stack == "decoder":
                linear(f"{source}/attention/linear_0", f"{target}.encoder_attn.q_proj")
                split_linear(f"{source}/attention/linear_1", [f"{target}.encoder_attn.{p}_proj" for p in "kv"])
                linear(f"{source}/attention/linear_2", f"{target}.encoder_attn.out_proj")
                layer_norm(f"{source}/attention/layer_norm", f"{target}.encoder_attn_layer_norm")
            linear(f"{source}/ffn/linear_0", f"{target}.fc1")
            linear(f"{source}/ffn/linear_1", f"{target}.fc2")
            layer_norm(f"{source}/ffn/layer_norm", f"{target}.final_layer_norm")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    state["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    state["proj_out.weight"] = take("decoder/projection/weight")

    unmapped = [
        name for name in model.variables if name not in used and name.rsplit("/", 1)[-1] not in SCALAR_VARIABLES
    ]
    if unmapped:
        raise DemoModelFetchError(f"CTranslate2 variables with no transformers counterpart: {unmapped[:10]}")
    return state


def build_whisper_tokenizer(tokenizer_json: Path, max_length: int) -> Any:
    """A `WhisperTokenizer` over the export's tokenizer.json, plus the 1501 timestamp tokens.

    Every special token is registered as an extra special token in id order, so the last special id is
    <|notimestamps|> and timestamp decoding (which starts right after it) finds the right ids.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizer

    added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
    specials = [token["content"] for token in sorted(added, key=lambda token: token["id"]) if token["special"]]
    if not specials or specials[-1] != "<|notimestamps|>":
        raise DemoModelFetchError(f"{tokenizer_json}: the last special token is not <|notimestamps|>")
    backend = Tokenizer.from_file(str(tokenizer_json))
    timestamps = [f"<|{index * 0.02:.2f}|>" for index in range(TIMESTAMP_COUNT)]
    backend.add_tokens([AddedToken(text, special=False, normalized=False) for text in timestamps])
    return WhisperTokenizer(
        tokenizer_object=backend,
        extra_special_tokens=specials,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )


def build_whisper_config(model: CTranslate2Model, tokenizer: Any, export_config: dict[str, Any]) -> WhisperConfig:
    """A `WhisperConfig` whose sizes come from the weights and whose token ids come from the tokenizer."""
    from transformers import WhisperConfig

    vocab_size, d_model = model.get("decoder/embeddings/weight").shape
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    start_of_transcript = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    return WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(model.get("encoder/conv1/weight").shape[1]),
        d_model=int(d_model),
        encoder_layers=count_layers(model, "encoder"),
        decoder_layers=count_layers(model, "decoder"),
        encoder_attention_heads=int(model.get("encoder/num_heads")),
        decoder_attention_heads=int(model.get("decoder/num_heads")),
        encoder_ffn_dim=int(model.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(model.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(model.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(model.get("decoder/position_encodings/encodings").shape[0]),
        bos_token_id=start_of_transcript,
        decoder_start_token_id=start_of_transcript,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        suppress_tokens=list(export_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(export_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
        scale_embedding=False,
        activation_function="gelu",
    )


def build_generation_config(config: WhisperConfig, tokenizer: Any, export_config: dict[str, Any]) -> Any:
    """Generation defaults: transcribe without timestamps; `return_timestamps=True` turns them on."""
    from transformers import GenerationConfig

    token_id = tokenizer.convert_tokens_to_ids
    is_multilingual = config.vocab_size >= 51865
    settings: dict[str, Any] = {
        "decoder_start_token_id": config.decoder_start_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "max_length": config.max_target_positions,
        "no_timestamps_token_id": token_id("<|notimestamps|>"),
        "prev_sot_token_id": token_id("<|startofprev|>"),
        "is_multilingual": is_multilingual,
        "return_timestamps": False,
        "max_initial_timestamp_index": 50,
        "suppress_tokens": list(config.suppress_tokens or []),
        "begin_suppress_tokens": list(config.begin_suppress_tokens or []),
        "alignment_heads": [list(head) for head in export_config.get("alignment_heads", [])],
        "forced_decoder_ids": None,
    }
    if is_multilingual:
        translate_id, transcribe_id = token_id("<|translate|>"), token_id("<|transcribe|>")
        start = config.decoder_start_token_id
        settings["lang_to_id"] = {
            tokenizer.convert_ids_to_tokens(index): index for index in range(start + 1, translate_id)
        }
        settings["task_to_id"] = {"translate": translate_id, "transcribe": transcribe_id}
        # Without a task the prompt would be <|sot|><|lang|> alone after language detection.
        settings["task"] = "transcribe"
    return GenerationConfig(**settings)


def build_whisper_processor(tokenizer: Any, num_mel_bins: int) -> WhisperProcessor:
    """Feature extractor (log-mel, 16 kHz, 30 s windows) plus the tokenizer."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLING_RATE)
    return WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def load_weights(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Copy `state` into `model`; raises unless every key matches and every shape fits."""
    import torch

    tensors = {name: torch.from_numpy(np.ascontiguousarray(array)).float() for name, array in state.items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise DemoModelFetchError(f"Whisper weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise DemoModelFetchError(f"Whisper weights do not fit the config: {error}") from error


def convert_ctranslate2_whisper(
    model_bin: Path, export_dir: Path, destination: Path, report_step: Callable[[str], None]
) -> None:
    """Convert `model_bin` (with config.json and tokenizer.json in `export_dir`) into `destination`."""
    from transformers import WhisperForConditionalGeneration

    report_step("speech: reading the CTranslate2 model")
    ctranslate2_model = read_ctranslate2_model(model_bin)
    if ctranslate2_model.spec_name != "WhisperSpec":
        raise DemoModelFetchError(f"{model_bin} holds a {ctranslate2_model.spec_name}, not a WhisperSpec")
    export_config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))

    report_step("speech: mapping weights onto WhisperForConditionalGeneration")
    state = whisper_state_dict(ctranslate2_model)
    decoder_positions = int(ctranslate2_model.get("decoder/position_encodings/encodings").shape[0])
    tokenizer = build_whisper_tokenizer(export_dir / "tokenizer.json", decoder_positions)
    config = build_whisper_config(ctranslate2_model, tokenizer, export_config)
    if len(tokenizer) != config.vocab_size:
        raise DemoModelFetchError(f"tokenizer has {len(tokenizer)} tokens, the weights {config.vocab_size}")
    model = WhisperForConditionalGeneration(config)
    load_weights(model, state)
    model.generation_config = build_generation_config(config, tokenizer, export_config)

    report_step("speech: saving model and processor")
    # The export's weights are float16: storing float16 loses nothing; loading defaults to float32.
    model.half().save_pretrained(destination)
    set_default_load_dtype(destination)
    build_whisper_processor(tokenizer, config.num_mel_bins).save_pretrained(destination)
    drop_runtime_tokenizer_settings(destination)
