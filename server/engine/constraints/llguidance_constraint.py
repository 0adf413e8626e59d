"""A TokenConstraint backed by an llguidance matcher: one instance per choice."""

from __future__ import annotations

import logging

import llguidance
import torch

logger = logging.getLogger(__name__)

_BIT_POSITIONS = torch.arange(32, dtype=torch.int32)


class LLGuidanceConstraint:
    """Allows only tokens that keep the output a prefix of the grammar's language.

    End-of-sequence is the sampler's business (it allows EOS only when `is_complete()`), so any
    EOS id the engine uses ends the choice, not only the tokenizer's own. If the matcher fails
    (grammar limits hit, or a token it did not allow was accepted), the failure is logged and
    the constraint reports itself complete with nothing else allowed, so the choice ends with EOS
    instead of producing text that breaks the grammar.
    """

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer_vocab_size: int) -> None:
        self._matcher = matcher
        self._tokenizer_vocab_size = tokenizer_vocab_size
        self._ended = False
        self._error_logged = False

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]; columns past the tokenizer's vocabulary (padding) are never allowed."""
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        if self._ended or self._failed():
            return allowed
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        bits = ((words.unsqueeze(1) >> _BIT_POSITIONS) & 1).flatten().to(torch.bool)
        usable = min(vocab_size, self._tokenizer_vocab_size, bits.shape[0])
        allowed[:usable] = bits[:usable]
        return allowed

    def accept(self, token_id: int) -> None:
        """Advance the matcher. A token the grammar does not take in a complete state (an EOS id
        other than the tokenizer's) ends the constraint instead of failing it."""
        if self._ended or self._failed():
            return
        if self._matcher.is_accepting() and self._matcher.validate_tokens([token_id]) == 0:
            self._ended = True
            return
        if not self._matcher.consume_token(token_id):
            self._failed()

    def is_complete(self) -> bool:
        """True when the output so far is a full match (or the matcher has failed, see class doc)."""
        return self._ended or self._failed() or self._matcher.is_accepting()

    def _failed(self) -> bool:
        if not self._matcher.is_error():
            return False
        if not self._error_logged:
            self._error_logged = True
            logger.warning("constrained decoding stopped: %s", self._matcher.get_error())
        return True
