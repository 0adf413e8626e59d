"""Incremental detokenization: turn one token at a time into exactly the new text it adds.

Decoding a token alone is wrong for most tokenizers: SentencePiece decoders strip the leading space
of the first token, byte-level BPE splits one character over several tokens. So each step decodes a
short window (a few tokens already emitted, then the new ones) and returns what the window gained
over its emitted part, as vLLM and TGI do. The window restarts after every emission, so its cost does
not grow with the output. Text that ends in U+FFFD (an incomplete UTF-8 character) is held back
until a later token completes it; `flush` releases whatever is still held when the choice ends.

Text is decoded without `clean_up_tokenization_spaces`, so it is what the model produced: the
concatenation of all pieces equals `tokenizer.decode(prompt + output,
clean_up_tokenization_spaces=False)` minus the decoded prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_REPLACEMENT_CHARACTER = "\ufffd"
# Prompt tokens decoded ahead of the first output token, so that its leading space is kept.
_PROMPT_CONTEXT_TOKENS = 5


def _make_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """A list-of-ids -> text function: the Rust decoder directly for fast tokenizers (no Python
    post-processing per call), otherwise the tokenizer's own decode."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class IncrementalDetokenizer:
    """Text of one choice, token by token. Invariant: the window `ids[:emitted_end]` decodes to
    `emitted_window_text` (already returned, or prompt context); `ids[emitted_end:]` are tokens
    whose text is still held back."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._decode = _make_decoder(tokenizer, skip_special_tokens)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # The window must start at a character: a byte-fallback decoder (Llama-2, Mistral, Gemma)
        # turns a whole run of byte tokens into U+FFFDs when the run starts mid-character, which
        # would read as text never emitted and leak into the output.
        while len(context) > 1 and self._decode(context).startswith(_REPLACEMENT_CHARACTER):
            context = context[1:]
        self._ids: list[int] = context
        # Prompt tokens that end inside a character count as held: an output token completes them.
        emitted_end = len(context)
        context_text = self._decode(context) if context else ""
        while emitted_end > 0 and context_text.endswith(_REPLACEMENT_CHARACTER):
            emitted_end -= 1
            context_text = self._decode(context[:emitted_end])
        self._emitted_end = emitted_end
        self._emitted_window_text = context_text

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty, never half a character)."""
        self._ids.append(token_id)
        window_text = self._decode(self._ids)
        if window_text.endswith(_REPLACEMENT_CHARACTER):
            return ""
        return self._emit(window_text)

    def flush(self) -> str:
        """Release text still held back (an incomplete character decodes to U+FFFD), at the end."""
        if self._emitted_end == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids))

    def _emit(self, window_text: str) -> str:
        if len(window_text) <= len(self._emitted_window_text):
            # The new tokens add no text yet (skipped special token, a decoder that merges later).
            return ""
        new_text = window_text[len(self._emitted_window_text) :]
        # Keep the last emitted tokens as the next window's context, then forget older ones.
        self._ids = self._ids[self._emitted_end :]
        self._emitted_end = len(self._ids)
        self._emitted_window_text = self._decode(self._ids)
        return new_text
