"""Factories of per-choice constraints: JSON object, JSON schema, Lark grammar, regex.

A factory compiles and validates its grammar once, when the request is admitted; calling it makes
a fresh constraint for one choice from a copy of the compiled matcher (microseconds).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jsonschema
import llguidance
from protoserve.server.engine.constraints.llguidance_constraint import LLGuidanceConstraint
from protoserve.server.engine.constraints.tokenizer_adapter import llguidance_tokenizer
from protoserve.server.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # defined only in the type stub

# Compact JSON (no free whitespace): small models otherwise tend to loop on whitespace forever.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


class ConstraintFactory:
    """Makes one `LLGuidanceConstraint` per choice from a grammar validated at construction."""

    def __init__(self, tokenizer: Any, grammar: str, description: str) -> None:
        self._llg_tokenizer = llguidance_tokenizer(tokenizer)
        # The matcher never raises: a grammar it cannot compile leaves it in an error state.
        self._template = llguidance.LLMatcher(self._llg_tokenizer, grammar, log_level=0)
        if self._template.is_error():
            raise InvalidRequestError(f"invalid {description}: {self._template.get_error().strip()}")
        self.description = description

    def __call__(self) -> LLGuidanceConstraint:
        return LLGuidanceConstraint(self._template.deep_copy(), self._llg_tokenizer.vocab_size)


def json_object_constraint(tokenizer: Any) -> ConstraintFactory:
    """Any JSON object (OpenAI `response_format: {"type": "json_object"}`)."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    return ConstraintFactory(tokenizer, grammar, "JSON object grammar")


def json_schema_constraint(tokenizer: Any, schema: dict[str, Any]) -> ConstraintFactory:
    """JSON that validates against `schema` (OpenAI `response_format: {"type": "json_schema"}`).

    Raises InvalidRequestError when the schema is not a JSON object, breaks the JSON Schema
    meta-schema, or uses a feature structured output does not support.
    """
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"JSON schema must be an object, got {type(schema).__name__}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"JSON schema is not serializable as JSON: {error}") from error
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        location = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise InvalidRequestError(f"invalid JSON schema at {location}: {error.message}") from error
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except ValueError as error:
        raise InvalidRequestError(f"invalid JSON schema: {error}") from error
    return ConstraintFactory(tokenizer, grammar, "JSON schema")


def lark_grammar_constraint(tokenizer: Any, grammar: str) -> ConstraintFactory:
    """Text in the language of a Lark grammar (llguidance dialect: `start` is the top rule, and
    `%json {...}` embeds a JSON schema, e.g. `start: "<tool_call>" %json {"type": "object"} "</tool_call>"`).

    An embedded schema allows free whitespace unless it says `"x-guidance": {"whitespace_flexible": false}`;
    say it, or small models may emit whitespace until max_tokens."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise InvalidRequestError("Lark grammar must be a non-empty string")
    return ConstraintFactory(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), "Lark grammar")


def regex_constraint(tokenizer: Any, pattern: str) -> ConstraintFactory:
    """Text that fully matches a regular expression (Rust `regex` syntax)."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidRequestError("regex must be a non-empty string")
    return ConstraintFactory(tokenizer, llguidance.LLMatcher.grammar_from_regex(pattern), "regex")
