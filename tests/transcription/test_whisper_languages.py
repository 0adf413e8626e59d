"""Language tokens: codes and names map to the tokens a whisper vocabulary actually has."""

from __future__ import annotations

import pytest
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.transcription.whisper_tokens import whisper_tokens

# What whisper_tokens looks up besides the languages (<|endoftext|> is the tokenizer's own).
SPECIALS = ["<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>", "<|startofprev|>",
            "<|notimestamps|>"]  # fmt: skip


def tokenizer_with(*language_tokens: str):  # noqa: ANN201 (a transformers WhisperTokenizer)
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {character: index for index, character in enumerate(bytes_to_unicode().values())}
    specials = [*SPECIALS, *language_tokens]
    return WhisperTokenizer(vocab=vocab, merges=[], additional_special_tokens=specials)


@pytest.mark.parametrize("hebrew_token", ["<|iw|>", "<|he|>"])
def test_hebrew_is_known_by_its_token_in_either_spelling(hebrew_token: str) -> None:
    """Whisper's vocabularies (and the ones converted here) call Hebrew <|iw|>; transformers' list says he."""
    tokenizer = tokenizer_with(hebrew_token)
    tokens = whisper_tokens(tokenizer, multilingual=True)
    assert tokens.language_ids["he"] == tokenizer.convert_tokens_to_ids(hebrew_token)
    assert {tokens.language_code(name) for name in ("he", "iw", "Hebrew", " HE ")} == {"he"}
    assert tokens.start_sequence("he", "transcribe")[1] == tokenizer.convert_tokens_to_ids(hebrew_token)


def test_languages_the_vocabulary_lacks_are_refused() -> None:
    tokens = whisper_tokens(tokenizer_with(), multilingual=True)
    assert tokens.language_code("german") == "de"
    with pytest.raises(InvalidRequestError, match="unknown language 'he'"):
        tokens.language_code("he")
