"""Tiny random models, a local word-level tokenizer, and helpers to drive the engine in tests.

The engine is compared with plain `model.generate` on the original model; the engine runs on a
deep copy, whose attention implementation it switches to paged attention.
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from protoserve.server.engine.api import EngineConfig, EngineRequest, RequestOutput, SamplingParams, Usage
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.loader import loaded_from_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

VOCAB_SIZE = 512
EOS_TOKEN_ID = VOCAB_SIZE - 1


@functools.cache
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Tokens "w0".."w510" plus "<eos>": token i decodes to "w{i}"."""
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE - 1)}
    vocab["<eos>"] = EOS_TOKEN_ID
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


# The dimensions of the tiny test decoders (any architecture's config takes them).
TINY_DECODER_DIMENSIONS: dict[str, int] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    settings: dict[str, object] = {
        **TINY_DECODER_DIMENSIONS,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": 0,
        "bos_token_id": 1,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_model(
    config: object, model_class: type[PreTrainedModel] = LlamaForCausalLM, seed: int = 0
) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = model_class(config)
    # Sharper logits than the default init, so greedy choices are not near-ties.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model.eval()


@dataclass
class EngineUnderTest:
    engine: LLMEngine
    reference: PreTrainedModel  # same weights, stock attention


def make_engine(model: PreTrainedModel, **config: object) -> EngineUnderTest:
    """An engine over a copy of `model`; `model` itself stays untouched as the reference."""
    reference = model
    settings: dict[str, object] = {"kv_cache_bytes": 1 << 20, "block_size": 4}
    settings.update(config)
    engine = LLMEngine(loaded_from_model(copy.deepcopy(model), word_tokenizer()), EngineConfig(**settings))  # type: ignore[arg-type]
    return EngineUnderTest(engine, reference)


@dataclass
class Collected:
    """Everything a request streamed: token ids and text per choice, finish reasons, usage."""

    token_ids: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    text: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    finish_reasons: dict[int, str] = field(default_factory=dict)
    usage: Usage | None = None
    finished: bool = False

    def add(self, output: RequestOutput) -> None:
        if self.finished:
            raise AssertionError(f"output after the final one: {output}")
        for delta in output.deltas:
            self.token_ids[delta.index].extend(delta.token_ids)
            self.text[delta.index] += delta.text
            if delta.finish_reason is not None:
                self.finish_reasons[delta.index] = delta.finish_reason.value
        self.finished = output.finished
        self.usage = output.usage


def run_until_done(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, Collected]:
    collected: dict[str, Collected] = defaultdict(Collected)
    for _ in range(max_steps):
        if not engine.has_unfinished_requests:
            return dict(collected)
        for output in engine.step():
            collected[output.request_id].add(output)
    raise AssertionError(f"engine did not finish within {max_steps} steps")


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)  # type: ignore[arg-type]


def reference_greedy(
    model: PreTrainedModel, prompt: Iterable[int], max_new_tokens: int, eos_token_ids: Iterable[int] = (EOS_TOKEN_ID,)
) -> list[int]:
    """Plain `generate` on one request alone: the generated ids, EOS included when it stopped there."""
    input_ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(eos_token_ids),
            pad_token_id=0,
        )
    return generated[0, input_ids.shape[1] :].tolist()


def random_prompts(count: int, min_length: int, max_length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        length = int(torch.randint(min_length, max_length + 1, (1,), generator=generator))
        prompts.append(torch.randint(2, VOCAB_SIZE - 1, (length,), generator=generator).tolist())
    return prompts


def submit(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, prefix: str = "r") -> list[str]:
    ids = []
    for index, prompt in enumerate(prompts):
        request_id = f"{prefix}{index}"
        engine.add_request(EngineRequest(request_id, tuple(prompt), params))
        ids.append(request_id)
    return ids
