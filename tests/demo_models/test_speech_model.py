"""The converted whisper tiny.en folder: loads cleanly, transcribes, does timestamps, round-trips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from protoserve.server.demo_models import DemoModels
from transformers import WhisperForConditionalGeneration, WhisperProcessor

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def fox_audio(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """espeak-ng saying SENTENCE, resampled to 16 kHz mono float32."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox must be on the PATH (make system-deps)")
    folder = tmp_path_factory.mktemp("speech")
    spoken, resampled = folder / "spoken.wav", folder / "fox16k.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), SENTENCE], check=True, capture_output=True)
    subprocess.run(["sox", str(spoken), "-r", "16000", "-c", "1", str(resampled)], check=True, capture_output=True)
    audio, rate = soundfile.read(resampled, dtype="float32")
    assert rate == 16000
    return audio


@pytest.fixture(scope="module")
def whisper(demo_models: DemoModels) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    model, loading_info = WhisperForConditionalGeneration.from_pretrained(demo_models.speech, output_loading_info=True)
    assert loading_info["missing_keys"] == set() or not loading_info["missing_keys"]
    assert not loading_info["unexpected_keys"] and not loading_info["mismatched_keys"]
    return model, WhisperProcessor.from_pretrained(demo_models.speech)


def test_config_has_tiny_en_sizes_and_token_ids(
    whisper: tuple[WhisperForConditionalGeneration, WhisperProcessor],
) -> None:
    model, processor = whisper
    config = model.config
    assert model.dtype == torch.float32
    assert (config.vocab_size, config.d_model, config.encoder_layers, config.decoder_layers) == (51864, 384, 4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads, config.encoder_ffn_dim) == (6, 6, 1536)
    assert (config.max_source_positions, config.max_target_positions, config.num_mel_bins) == (1500, 448, 80)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (50257, 50256, 50256)
    generation = model.generation_config
    assert generation.no_timestamps_token_id == 50362 and generation.is_multilingual is False
    assert generation.max_length == 448 and generation.forced_decoder_ids is None
    assert generation.begin_suppress_tokens == [220, 50256] and 50257 in generation.suppress_tokens
    assert len(generation.alignment_heads) == 8
    assert torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 51864
    assert tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|notimestamps|>"]
    ) == [
        50256,
        50257,
        50258,
        50362,
    ]
    assert tokenizer.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50363, 51863]


def test_transcribes_english_without_timestamps_by_default(
    whisper: tuple[WhisperForConditionalGeneration, WhisperProcessor], fox_audio: np.ndarray
) -> None:
    model, processor = whisper
    features = processor(fox_audio, sampling_rate=16000, return_tensors="pt").input_features
    tokens = model.generate(features)
    assert not (tokens >= 50363).any()
    text = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    assert "quick brown fox" in text.lower()


def test_return_timestamps_produces_timestamp_tokens(
    whisper: tuple[WhisperForConditionalGeneration, WhisperProcessor], fox_audio: np.ndarray
) -> None:
    model, processor = whisper
    features = processor(fox_audio, sampling_rate=16000, return_tensors="pt").input_features
    tokens = model.generate(features, return_timestamps=True)[0].tolist()
    timestamps = [token for token in tokens if token >= 50363]
    assert len(timestamps) >= 2 and timestamps == sorted(timestamps)
    decoded = processor.tokenizer.decode(tokens, output_offsets=True)
    assert "quick brown fox" in decoded["text"].lower()
    start, end = decoded["offsets"][0]["timestamp"]
    assert 0.0 <= start < end <= len(fox_audio) / 16000 + 1.0
    with_markers = processor.tokenizer.decode(tokens, decode_with_timestamps=True)
    assert with_markers.startswith("<|0.00|>") or with_markers.startswith("<|")
    assert "quick brown fox" in processor.tokenizer.decode(tokens, skip_special_tokens=True).lower()


def test_processor_round_trips_save_and_load(
    whisper: tuple[WhisperForConditionalGeneration, WhisperProcessor], tmp_path: Path
) -> None:
    _, processor = whisper
    processor.save_pretrained(tmp_path)
    reloaded = WhisperProcessor.from_pretrained(tmp_path)
    text = " The quick brown fox."
    assert reloaded.tokenizer(text).input_ids == processor.tokenizer(text).input_ids
    assert reloaded.tokenizer.all_special_ids == processor.tokenizer.all_special_ids
    assert reloaded.feature_extractor.to_dict() == processor.feature_extractor.to_dict()
    assert reloaded.feature_extractor.feature_size == 80
