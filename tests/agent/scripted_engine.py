"""A `GenerationEngine` whose output is fixed text, tokenized by a real tokenizer, for end-to-end
tests of the real servicer and parsers: the server sees the same token stream a model would give.

Each request takes the next scripted text; its tokens are emitted `tokens_per_step` at a time, with
each step's text decoded as a model's would be (the decoded prefix minus the previous one). The
decoded prompt of every request is kept, so a test can see what the template rendered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from protoserve.server.engine.api import (
    CompletionDelta,
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestOutput,
    Usage,
)
from protoserve.server.registry import ModelDescription, ServedGenerationModel


@dataclass
class ScriptedEngine:
    tokenizer: Any
    texts: list[str]
    tokens_per_step: int = 3
    context_length: int = 8192
    prompts: list[str] = field(default_factory=list)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.prompts.append(self.tokenizer.decode(list(request.prompt_token_ids), skip_special_tokens=False))
        if not self.texts:
            raise RuntimeError("the scripted engine has no more texts")
        token_ids = self.tokenizer.encode(self.texts.pop(0), add_special_tokens=False)
        released = ""
        for start in range(0, len(token_ids), self.tokens_per_step):
            end = min(start + self.tokens_per_step, len(token_ids))
            text = self.tokenizer.decode(token_ids[:end], skip_special_tokens=False)
            last = end == len(token_ids)
            delta = CompletionDelta(
                index=0,
                text=text[len(released) :],
                token_ids=tuple(token_ids[start:end]),
                finish_reason=FinishReason.STOP if last else None,
            )
            released = text
            usage = Usage(len(request.prompt_token_ids), len(token_ids)) if last else None
            yield RequestOutput(request.request_id, (delta,), finished=last, usage=usage)

    def abort(self, request_id: str) -> None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0, 0, 0, 0, True)

    async def shutdown(self) -> None:
        return None


def served_scripted_model(engine: ScriptedEngine, model_id: str = "scripted-smollm2") -> ServedGenerationModel:
    description = ModelDescription(
        id=model_id,
        owned_by="tests",
        created=0,
        modalities=("text",),
        context_length=engine.context_length,
        quantization="none",
        loaded=True,
        architecture="LlamaForCausalLM",
        dtype="float32",
        device="cpu",
        capabilities=("generate", "chat"),
    )
    loaded = SimpleNamespace(
        tokenizer=engine.tokenizer,
        processor=None,
        eos_token_ids={engine.tokenizer.eos_token_id},
        context_length=engine.context_length,
        modalities=("text",),
        model_id=model_id,
    )
    return ServedGenerationModel(description, loaded, engine)
