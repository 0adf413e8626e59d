"""Speech clips for the transcription tests, spoken by espeak-ng and converted by sox and PyAV."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest

QUICK_BROWN_FOX = "The quick brown fox jumps over the lazy dog."


def _require_tools() -> None:
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not on the PATH; run `make system-deps`")


@pytest.fixture(scope="session")
def speech_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with fox.wav (16 kHz mono) and fox.flac / fox.ogg made from it."""
    _require_tools()
    folder = tmp_path_factory.mktemp("speech")
    raw = folder / "raw.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), QUICK_BROWN_FOX], check=True, capture_output=True)
    wav = folder / "fox.wav"
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True, capture_output=True)
    for suffix in ("flac", "ogg"):
        subprocess.run(["sox", str(wav), str(folder / f"fox.{suffix}")], check=True, capture_output=True)
    return folder


@pytest.fixture(scope="session")
def fox_wav(speech_folder: Path) -> bytes:
    return (speech_folder / "fox.wav").read_bytes()


def encode_with_pyav(samples: np.ndarray, container_format: str, codec: str, rate: int = 16_000) -> bytes:
    """Encode mono float samples with PyAV (mp3, m4a/aac, webm/opus where sox cannot)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_size = 1024
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        for start in range(0, pcm.size, frame_size):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + frame_size], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


AudioEncoder = Callable[..., bytes]


@pytest.fixture(scope="session")
def encode_audio() -> AudioEncoder:
    """`encode_audio(samples, container_format="wav", codec="pcm_s16le", rate=16000) -> bytes`."""

    def encode(
        samples: np.ndarray, container_format: str = "wav", codec: str = "pcm_s16le", rate: int = 16_000
    ) -> bytes:
        return encode_with_pyav(samples, container_format, codec, rate)

    return encode


WHISPER_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>", "<|transcribe|>",
    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
]  # fmt: skip
TIMESTAMP_TOKENS = 1501  # <|0.00|> ... <|30.00|>


def _save_tiny_whisper(folder: Path, multilingual: bool) -> Path:
    """A random whisper with whisper's token layout: 256 byte tokens, the specials, the timestamps."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {character: index for index, character in enumerate(bytes_to_unicode().values())}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], additional_special_tokens=WHISPER_SPECIAL_TOKENS[1:])
    vocab_size = len(tokenizer) + TIMESTAMP_TOKENS
    config = WhisperConfig(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
        decoder_start_token_id=257,
        architectures=["WhisperForConditionalGeneration"],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        is_multilingual=multilingual, decoder_start_token_id=257, eos_token_id=256, pad_token_id=256
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_whisper_english(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_whisper(tmp_path_factory.mktemp("whisper-en"), multilingual=False)


@pytest.fixture(scope="session")
def tiny_whisper_multilingual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_whisper(tmp_path_factory.mktemp("whisper-multi"), multilingual=True)
