"""Constrained decoding (structured output, forced tool-call shapes) with llguidance.

Each factory validates its grammar when it is built (bad input raises InvalidRequestError then,
never at decode time) and returns a `ConstraintFactory`: a callable that makes one fresh
`TokenConstraint` per choice, cheaply (a copy of a matcher compiled once).
"""

from __future__ import annotations

from protoserve.server.engine.constraints.factories import (
    ConstraintFactory,
    json_object_constraint,
    json_schema_constraint,
    lark_grammar_constraint,
    regex_constraint,
)
from protoserve.server.engine.constraints.llguidance_constraint import LLGuidanceConstraint
from protoserve.server.engine.constraints.tokenizer_adapter import llguidance_tokenizer

__all__ = [
    "ConstraintFactory",
    "LLGuidanceConstraint",
    "json_object_constraint",
    "json_schema_constraint",
    "lark_grammar_constraint",
    "llguidance_tokenizer",
    "regex_constraint",
]
