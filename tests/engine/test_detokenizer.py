"""The incremental detokenizer matches a full decode and never splits a character."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import pytest
from protoserve.server.engine.detokenizer import IncrementalDetokenizer

from .sampling_fixtures import (
    MULTILINGUAL_TEXTS,
    byte_level_tokenizer,
    sentencepiece_tokenizer,
    smollm2_tokenizer_fixture,  # noqa: F401 (a fixture)
)

TOKENIZERS = {"byte_level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}


def full_decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def stream(tokenizer: Any, prompt: Sequence[int], output: Sequence[int], skip: bool) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    pieces = [detokenizer.add(token_id) for token_id in output]
    pieces.append(detokenizer.flush())
    return pieces


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return TOKENIZERS[request.param]()


@pytest.mark.parametrize("text", MULTILINGUAL_TEXTS)
def test_text_streams_back_exactly_without_split_characters(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, [], ids, skip=True)
    assert "".join(pieces) == full_decode(tokenizer, ids, True)
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[-1] == ""  # nothing was left held back: every character completed in time


@pytest.mark.parametrize("text", MULTILINGUAL_TEXTS)
def test_output_after_a_prompt_keeps_its_leading_space(tokenizer: Any, text: str) -> None:
    full = tokenizer.encode("Hello world, this is a test: " + text, add_special_tokens=False)
    prompt_length = len(tokenizer.encode("Hello world, this is", add_special_tokens=False))
    prompt, output = full[:prompt_length], full[prompt_length:]
    expected = full_decode(tokenizer, full, True)[len(full_decode(tokenizer, prompt, True)) :]
    pieces = stream(tokenizer, prompt, output, skip=True)
    assert "".join(pieces) == expected
    assert pieces[0].startswith(" ")
    assert all("\ufffd" not in piece for piece in pieces)


@functools.cache
def complete_character_tokens(tokenizer: Any) -> list[int]:
    """Non-special tokens that decode to whole characters on their own."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special and "\ufffd" not in tokenizer.decode([i])]


def random_tokens(tokenizer: Any, rng: random.Random, count: int) -> list[int]:
    """Random regular tokens, special tokens, and the (often several byte) tokens of multi-byte
    characters. Lone byte tokens are left out: a SentencePiece decoder re-decodes a run of
    byte-fallback tokens as a whole, so invalid UTF-8 decodes differently once more bytes follow (true of any
    incremental detokenizer, and not something a model produces)."""
    regular = complete_character_tokens(tokenizer)
    characters = "😀🎉你好世界こんにちはéßü€✓🚀"
    output: list[int] = []
    while len(output) < count:
        draw = rng.random()
        if draw < 0.1:
            output.append(rng.choice(tokenizer.all_special_ids))
        elif draw < 0.4:
            output.extend(tokenizer.encode(rng.choice(characters), add_special_tokens=False))
        else:
            output.append(rng.choice(regular))
    return output


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences_equal_the_full_decode(tokenizer: Any, seed: int, skip: bool) -> None:
    rng = random.Random(seed)
    output = random_tokens(tokenizer, rng, 40)
    pieces = stream(tokenizer, [], output, skip)
    assert "".join(pieces) == full_decode(tokenizer, output, skip)
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("seed", range(10))
def test_any_byte_level_token_sequence_equals_the_full_decode(seed: int) -> None:
    """Byte-level BPE decodes invalid UTF-8 the same whatever follows, so any ids at all work."""
    tokenizer = byte_level_tokenizer()
    rng = random.Random(seed)
    output = [rng.randrange(len(tokenizer)) for _ in range(60)]
    assert "".join(stream(tokenizer, [], output, True)) == full_decode(tokenizer, output, True)


def test_special_tokens_follow_skip_special_tokens() -> None:
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("Hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, [], ids, skip=True)) == "Hi"
    assert "".join(stream(tokenizer, [], ids, skip=False)) == "Hi<|endoftext|>"


def test_prompt_that_ends_inside_a_character() -> None:
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("ok 😀 fine", add_special_tokens=False)
    split = next(i for i in range(1, len(ids)) if full_decode(tokenizer, ids[:i], True).endswith("\ufffd"))
    pieces = stream(tokenizer, ids[:split], ids[split:], skip=True)
    assert "".join(pieces).endswith(" fine")
    assert "😀" in "".join(pieces)
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("prompt_text", ["Reply with an emoji: 😀😀", "你好世界", "ok 🎉🚀✓"])
def test_prompt_window_starting_inside_a_character_leaks_nothing(prompt_text: str) -> None:
    """The last prompt tokens decoded as context may start mid-character (many byte-fallback tokens
    at the end of the prompt); a SentencePiece decoder then makes the whole byte run U+FFFD."""
    tokenizer = sentencepiece_tokenizer()
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    output = tokenizer.encode(" Sure, the test!", add_special_tokens=False)
    expected = full_decode(tokenizer, prompt + output, True)[len(full_decode(tokenizer, prompt, True)) :]
    pieces = stream(tokenizer, prompt, output, skip=True)
    assert "".join(pieces) == expected
    assert all("\ufffd" not in piece for piece in pieces)


def test_work_per_token_does_not_grow_with_the_output() -> None:
    class CountingTokenizer:
        """Wraps a tokenizer and records the length of every decoded window."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.window_lengths: list[int] = []

        def decode(self, ids: list[int], **options: Any) -> str:
            self.window_lengths.append(len(ids))
            return self.inner.decode(ids, **options)

    counting = CountingTokenizer(byte_level_tokenizer())
    ids = counting.inner.encode("The quick brown fox jumps over the lazy dog. " * 20, add_special_tokens=False)
    pieces = stream(counting, [], ids, skip=True)
    assert "".join(pieces) == full_decode(counting.inner, ids, True)
    assert max(counting.window_lengths) <= 4


def test_real_smollm2_tokenizer_streams_chat_output(smollm2_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Say hi"}]
    prompt_text = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = smollm2_tokenizer.encode(prompt_text, add_special_tokens=False)
    for text in MULTILINGUAL_TEXTS:
        output = smollm2_tokenizer.encode(text, add_special_tokens=False) + [smollm2_tokenizer.eos_token_id]
        for skip in (True, False):
            pieces = stream(smollm2_tokenizer, prompt, output, skip)
            expected = full_decode(smollm2_tokenizer, prompt + output, skip)[
                len(full_decode(smollm2_tokenizer, prompt, skip)) :
            ]
            assert "".join(pieces) == expected
            assert all("\ufffd" not in piece for piece in pieces)
