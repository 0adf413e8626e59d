"""Constrained decoding with llguidance: what a random model writes under a constraint parses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch
from protoserve.server.engine.api import FinishReason, SamplingParams
from protoserve.server.engine.constraints import (
    json_object_constraint,
    json_schema_constraint,
    lark_grammar_constraint,
    llguidance_tokenizer,
    regex_constraint,
)
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.engine.output_processor import ChoiceOutputProcessor
from protoserve.server.engine.sampler import Sampler, SamplingRow

from .sampling_fixtures import (
    byte_level_tokenizer,
    smollm2_tokenizer_fixture,  # noqa: F401 (a fixture)
    tiny_llama,
)

TOKENIZER = byte_level_tokenizer()
PADDED_VOCAB = len(TOKENIZER) + 7  # the model's output layer is wider than the tokenizer
MODEL = tiny_llama(PADDED_VOCAB)
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's matmuls are far faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def generate(params: SamplingParams, seed: int | None = None, max_tokens: int = 300) -> ChoiceOutputProcessor:
    """Decode with the tiny random model (no KV cache: the sequences are short), one choice."""
    assert params.constraint_factory is not None
    constraint = params.constraint_factory()
    eos_ids = frozenset({TOKENIZER.eos_token_id})
    prompt = TOKENIZER.encode("Reply in JSON:", add_special_tokens=False)
    choice = ChoiceOutputProcessor(TOKENIZER, params, 0, prompt, eos_ids, len(prompt) + max_tokens)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sampler = Sampler()
    while not choice.finished:
        ids = torch.tensor([prompt + list(choice.output_token_ids)])
        logits = MODEL(input_ids=ids).logits[:, -1, :]
        row = SamplingRow(params, generator, prompt, choice.output_token_ids, constraint, eos_ids)
        result = sampler.sample(logits, [row])
        choice.append(result.token_ids[0], result.logprobs[0])
    return choice


def final_text(choice: ChoiceOutputProcessor) -> str:
    delta = choice.take_delta()
    assert delta is not None
    return delta.text


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_json_schema_output_parses_and_validates(seed: int | None) -> None:
    factory = json_schema_constraint(TOKENIZER, PERSON_SCHEMA)
    params = SamplingParams(temperature=0.0 if seed is None else 1.0, constraint_factory=factory)
    choice = generate(params, seed)
    assert choice.finish_reason is FinishReason.STOP
    assert all(token < len(TOKENIZER) for token in choice.output_token_ids)
    document = json.loads(final_text(choice))
    jsonschema.validate(document, PERSON_SCHEMA)


@pytest.mark.parametrize("seed", [1, 2])
def test_json_object_output_parses(seed: int) -> None:
    closing = {TOKENIZER.convert_tokens_to_ids(token): 2.0 for token in ("}", '"', "]", "<|endoftext|>")}
    params = SamplingParams(constraint_factory=json_object_constraint(TOKENIZER), logit_bias=closing)
    choice = generate(params, seed)
    assert choice.finish_reason is FinishReason.STOP
    assert isinstance(json.loads(final_text(choice)), dict)


def test_lark_tool_call_shape() -> None:
    compact_schema = {**PERSON_SCHEMA, "x-guidance": {"whitespace_flexible": False}}
    grammar = 'start: "<tool_call>" %json ' + json.dumps(compact_schema) + ' "</tool_call>"'
    choice = generate(SamplingParams(temperature=0.0, constraint_factory=lark_grammar_constraint(TOKENIZER, grammar)))
    text = final_text(choice)
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
    jsonschema.validate(json.loads(text.removeprefix("<tool_call>").removesuffix("</tool_call>")), PERSON_SCHEMA)


def test_regex_constraint() -> None:
    choice = generate(SamplingParams(temperature=0.0, constraint_factory=regex_constraint(TOKENIZER, r"(yes|no)!")))
    assert final_text(choice) in ("yes!", "no!")


def test_padding_columns_are_masked_and_choices_are_independent() -> None:
    factory = json_schema_constraint(TOKENIZER, PERSON_SCHEMA)
    first, second = factory(), factory()
    mask = first.allowed_token_mask(PADDED_VOCAB)
    assert mask.shape == (PADDED_VOCAB,) and mask.dtype == torch.bool
    assert not mask[len(TOKENIZER) :].any()
    allowed = mask.nonzero().flatten().tolist()
    assert allowed and all(TOKENIZER.decode([token_id]).startswith("{") for token_id in allowed)
    first.accept(allowed[0])
    assert torch.equal(second.allowed_token_mask(PADDED_VOCAB), mask)
    assert not first.is_complete()


def test_forced_valid_document_is_accepted_and_completes() -> None:
    factory = json_schema_constraint(TOKENIZER, PERSON_SCHEMA)
    constraint = factory()
    for token_id in TOKENIZER.encode('{"name":"Ada","age":36,"ok":true}', add_special_tokens=False):
        assert constraint.allowed_token_mask(len(TOKENIZER))[token_id]
        constraint.accept(token_id)
    assert constraint.is_complete()
    assert constraint.allowed_token_mask(len(TOKENIZER))[TOKENIZER.eos_token_id]
    # An end-of-sequence id llguidance does not know (another EOS of the model) ends it cleanly.
    constraint.accept(TOKENIZER.convert_tokens_to_ids("<|im_end|>"))
    assert constraint.is_complete() and not constraint.allowed_token_mask(len(TOKENIZER)).any()


def test_a_token_the_grammar_refused_ends_the_constraint_instead_of_crashing() -> None:
    constraint = json_object_constraint(TOKENIZER)()
    constraint.accept(TOKENIZER.convert_tokens_to_ids("x"))
    assert constraint.is_complete()
    assert not constraint.allowed_token_mask(len(TOKENIZER)).any()


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "nonsense"}, "invalid JSON schema at type"),
        ({"type": "string", "minLength": "x"}, "invalid JSON schema at minLength"),
        ({"type": "object", "properties": {"a": {"$ref": "#/missing"}}}, "/missing"),
        ({"type": "string", "pattern": "("}, "pattern"),
        ([{"type": "string"}], "must be an object"),
        ({"type": "object", "default": {1, 2}}, "not serializable"),
    ],
)
def test_invalid_json_schema_errors_clearly_when_built(schema: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        json_schema_constraint(TOKENIZER, schema)


@pytest.mark.parametrize(
    ("grammar", "message"), [("start: missing_rule", "missing_rule"), ("", "non-empty"), ("start: (", "Lark")]
)
def test_invalid_lark_grammar_errors_clearly(grammar: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        lark_grammar_constraint(TOKENIZER, grammar)


def test_slow_tokenizer_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequestError, match="fast"):
        json_object_constraint(object())


def test_tokenizer_adapter_is_built_once() -> None:
    assert llguidance_tokenizer(TOKENIZER) is llguidance_tokenizer(TOKENIZER)


def test_real_smollm2_tokenizer(smollm2_tokenizer: Any) -> None:
    factory = json_schema_constraint(smollm2_tokenizer, PERSON_SCHEMA)
    constraint = factory()
    vocab = len(smollm2_tokenizer) + 64
    for token_id in smollm2_tokenizer.encode('{"name":"Zoë","age":7,"tags":["bb"],"ok":false}'):
        mask = constraint.allowed_token_mask(vocab)
        assert mask[token_id] and not mask[len(smollm2_tokenizer) :].any()
        constraint.accept(token_id)
    assert constraint.is_complete()
    refused = factory()
    assert not refused.allowed_token_mask(vocab)[smollm2_tokenizer.encode("hello")[0]]
