"""Tokenizers and tiny models for the sampling, detokenizer, stop-string and constraint tests.

Tokenizers are trained locally in well under a second on a small ASCII corpus, so emoji, CJK and
accented characters fall back to several byte tokens: exactly the split characters the
detokenizer must hold back. `smollm2_tokenizer` is the real SmolLM2 tokenizer when the demo model
is available, and skips otherwise.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, this is a test of the tokenizer.",
    'JSON looks like {"name": "Ada", "age": 36, "tags": ["math", "code"], "ok": true, "none": null}.',
    "Numbers 0123456789, punctuation !?;:-_()[]{}<>/\\|@#$%^&*+=~`'\" and new\nlines\tand tabs.",
    "STOP here. END of text. Stop strings like ### and <|end|> appear in outputs.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MULTILINGUAL_TEXTS = [
    "Hello 😀 world",
    "你好，世界！こんにちは",
    "naïve café Über straße",
    "emoji run 🎉🎉👩‍👩‍👧 done",
    " leading space and trailing space ",
    "mixed: 汉字 and ascii and 🚀",
]


@functools.cache
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2/SmolLM2-style byte-level BPE tokenizer (about 400 tokens)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@functools.cache
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style SentencePiece BPE tokenizer: "▁" for spaces, byte fallback, the decoder strips
    the first leading space."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIAL_TOKENS], show_progress=False)
    trained.train_from_iterator(CORPUS * 20, trainer)
    spec = json.loads(trained.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["unk_token"] = "<unk>"
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<unk>")


@pytest.fixture(scope="session", name="smollm2_tokenizer")
def smollm2_tokenizer_fixture(request: pytest.FixtureRequest) -> Any:
    """The real SmolLM2 tokenizer; skips while the demo-model fetcher is not available."""
    try:
        from protoserve.server.demo_models import fetch_demo_models  # noqa: F401
    except ImportError:
        pytest.skip("protoserve.server.demo_models.fetch_demo_models is not available yet")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(request.getfixturevalue("chat_model_path"))


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random two-layer Llama whose output layer is `vocab_size` wide (may exceed the tokenizer's)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()
