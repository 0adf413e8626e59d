"""The special tokens of a whisper tokenizer, looked up by name instead of hard-coded ids.

Whisper's vocabulary puts text tokens below `<|endoftext|>`, then special tokens, then the
timestamp tokens `<|0.00|>` ... `<|30.00|>` starting right after `<|notimestamps|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protoserve.server.engine.errors import InvalidRequestError, UnsupportedModelError
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

TIME_PER_TIMESTAMP = 0.02  # seconds per timestamp token step


@dataclass(frozen=True)
class WhisperTokens:
    """Ids of whisper's special tokens and the languages the tokenizer knows."""

    end_of_text: int
    start_of_transcript: int
    start_of_previous: int
    no_timestamps: int
    transcribe: int
    translate: int
    language_ids: dict[str, int]  # language code -> token id
    multilingual: bool
    # <|nospeech|> (called <|nocaptions|> in older tokenizers): the model's "this window is silent"
    # token; None when the tokenizer has neither, and then no window is judged silent.
    no_speech: int | None = None

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    def is_text(self, token_id: int) -> bool:
        return token_id < self.end_of_text

    def is_timestamp(self, token_id: int) -> bool:
        return token_id >= self.timestamp_begin

    def language_code(self, language: str) -> str:
        """Normalise a language given as a code ("en") or a name ("english"); refuse unknown ones."""
        wanted = language.strip().lower()
        code = TO_LANGUAGE_CODE.get(wanted, wanted)
        code = next((current for current, older in _OLDER_LANGUAGE_CODES.items() if older == code), code)
        if code not in self.language_ids:
            raise InvalidRequestError(
                f"unknown language {language!r}; use an ISO-639-1 code such as en, de, fr, es, ja"
            )
        return code

    def start_sequence(self, language_code: str, task: str) -> list[int]:
        """The decoder prompt after any previous text: <|startoftranscript|> [<|lang|> <|task|>]."""
        if not self.multilingual:
            return [self.start_of_transcript]
        task_id = self.translate if task == "translate" else self.transcribe
        return [self.start_of_transcript, self.language_ids[language_code], task_id]


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise UnsupportedModelError(f"the speech model's tokenizer has no {token} token; is it a whisper tokenizer?")
    return int(token_id)


def _optional_token_id(tokenizer: Any, names: tuple[str, ...]) -> int | None:
    """The id of the first of `names` the tokenizer knows (not mapped to the unknown token), or None."""
    for name in names:
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is not None and not (token_id == tokenizer.unk_token_id and name != tokenizer.unk_token):
            return int(token_id)
    return None


# Older language codes that whisper vocabularies use for a token where transformers' list has the
# current code: Hebrew is <|iw|> in the vocabularies converted here.
_OLDER_LANGUAGE_CODES = {"he": "iw"}


def whisper_tokens(tokenizer: Any, multilingual: bool) -> WhisperTokens:
    """Look up the special tokens; raises UnsupportedModelError when one is missing."""
    language_ids: dict[str, int] = {}
    for code in LANGUAGES:
        for name in (code, _OLDER_LANGUAGE_CODES.get(code)):
            token_id = tokenizer.convert_tokens_to_ids(f"<|{name}|>") if name else None
            if token_id is not None and token_id != tokenizer.unk_token_id:
                language_ids[code] = int(token_id)
                break
    if not language_ids:
        raise UnsupportedModelError("the speech model's tokenizer has no language tokens; is it a whisper tokenizer?")
    return WhisperTokens(
        end_of_text=_token_id(tokenizer, "<|endoftext|>"),
        start_of_transcript=_token_id(tokenizer, "<|startoftranscript|>"),
        start_of_previous=_token_id(tokenizer, "<|startofprev|>"),
        no_timestamps=_token_id(tokenizer, "<|notimestamps|>"),
        transcribe=_token_id(tokenizer, "<|transcribe|>"),
        translate=_token_id(tokenizer, "<|translate|>"),
        language_ids=language_ids,
        multilingual=multilingual,
        no_speech=_optional_token_id(tokenizer, ("<|nospeech|>", "<|nocaptions|>")),
    )
