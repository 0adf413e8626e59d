"""Fakes for the generation service's tests: a tiny real tokenizer with a chat template, a scripted
engine, simple hermes-style tool-call and `<think>` parsers, and a servicer on a loopback gRPC server."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc.aio
from protoserve.server.chat.parsing_hooks import ChatParsing, prompt_ends_inside_tags
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.engine.api import (
    CompletionDelta,
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestOutput,
    TokenLogprob,
    TopToken,
    Usage,
)
from protoserve.server.limits import RequestLimits
from protoserve.server.registry import ModelDescription, ModelRegistry, ServedGenerationModel
from protoserve.server.services.generation import GenerationServicer
from protoserve.v1 import generation_pb2_grpc

CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}<|im_start|>{{ message.role + '\\n' }}"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- else %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<image>{% else %}{{ part.text }}{% endif %}{% endfor %}{% endif %}"
    "{%- for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
)
CORPUS = [
    "hello world, the capital of France is Paris. What is the weather in Paris today?",
    "tool_call think answer reasoning user assistant system tools arguments name city",
    '0123456789 {} [] : , " abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ é ü',
]


@functools.cache
def tiny_tokenizer(with_template: bool = True) -> Any:
    """A byte-level BPE tokenizer (~300 ids) trained in memory, with ChatML-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>", "<image>"])
    if with_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---- scripted engine ----

Script = Callable[[EngineRequest], Sequence[RequestOutput]]


def text_script(
    pieces_per_choice: Sequence[Sequence[str]],
    *,
    finish: FinishReason = FinishReason.STOP,
    with_logprobs: bool = False,
    cached_tokens: int = 0,
) -> Script:
    """An engine script: step i gives each choice its i-th piece; a choice's last piece finishes it."""

    def script(request: EngineRequest) -> list[RequestOutput]:
        tokenizer = tiny_tokenizer()
        outputs = []
        steps = max(len(pieces) for pieces in pieces_per_choice)
        completion = 0
        for step in range(steps):
            deltas = []
            for index, pieces in enumerate(pieces_per_choice):
                if step >= len(pieces):
                    continue
                token_ids = tuple(tokenizer.encode(pieces[step], add_special_tokens=False))
                completion += len(token_ids)
                logprobs = None
                if with_logprobs:
                    logprobs = tuple(
                        TokenLogprob(token_id, -0.5, (TopToken(token_id, -0.5), TopToken(1, -2.0)))
                        for token_id in token_ids
                    )
                last = step == len(pieces) - 1
                deltas.append(
                    CompletionDelta(
                        index=index,
                        text=pieces[step],
                        token_ids=token_ids,
                        logprobs=logprobs,
                        finish_reason=finish if last else None,
                        stop_reason=None,
                    )
                )
            final = step == steps - 1
            usage = Usage(len(request.prompt_token_ids), completion, cached_tokens) if final else None
            outputs.append(RequestOutput(request.request_id, tuple(deltas), finished=final, usage=usage))
        return outputs

    return script


@dataclass
class FakeEngine:
    """A GenerationEngine that plays a script. `hang_after` outputs, it waits until aborted."""

    script: Script = field(default_factory=lambda: text_script([["Hello", " world"]]))
    context_length: int = 256
    hang_after: int | None = None
    requests: list[EngineRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        finished = False
        try:
            for position, output in enumerate(self.script(request)):
                if self.hang_after is not None and position >= self.hang_after:
                    self.started.set()
                    await asyncio.Event().wait()
                yield output
                finished = output.finished
            self.started.set()
        finally:
            if not finished:
                self.aborted.append(request.request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0, 0, 0, 0, True)

    async def shutdown(self) -> None:
        return None


def served_model(engine: FakeEngine, *, tokenizer: Any = None, processor: Any = None) -> ServedGenerationModel:
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    modalities = ("text", "image") if processor is not None else ("text",)
    description = ModelDescription(
        id="tiny",
        owned_by="tests",
        created=0,
        modalities=modalities,
        context_length=engine.context_length,
        quantization="none",
        loaded=True,
        architecture="FakeForCausalLM",
        dtype="float32",
        device="cpu",
        capabilities=("generate", "chat"),
    )
    loaded = SimpleNamespace(
        tokenizer=tokenizer,
        processor=processor,
        eos_token_ids={tokenizer.eos_token_id},
        context_length=engine.context_length,
        modalities=modalities,
        model_id="tiny",
    )
    return ServedGenerationModel(description, loaded, engine)


def server_config(limits: RequestLimits | None = None, tool_parser: str = "auto") -> ServerConfig:
    return ServerConfig(
        models=(ModelSpec("tiny", "unused"),), limits=limits or RequestLimits(), tool_parser=tool_parser
    )


# ---- parsers ----


@dataclass
class ToolCallEvent:
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class TextEvent:
    text: str


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": ...}</tool_call>`: the name in one delta, arguments in a second."""

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False
        self._count = 0

    def feed(self, text: str) -> list[Any]:
        self._buffer += text
        events: list[Any] = []
        while True:
            if not self._inside:
                start = self._buffer.find("<tool_call>")
                if start < 0:
                    keep = _partial_suffix(self._buffer, "<tool_call>")
                    released, self._buffer = (
                        self._buffer[: len(self._buffer) - keep],
                        self._buffer[len(self._buffer) - keep :],
                    )
                    if released:
                        events.append(TextEvent(released))
                    return events
                if start:
                    events.append(TextEvent(self._buffer[:start]))
                self._buffer, self._inside = self._buffer[start + len("<tool_call>") :], True
            end = self._buffer.find("</tool_call>")
            if end < 0:
                return events
            call = json.loads(self._buffer[:end])
            events.append(ToolCallEvent(self._count, f"call_{self._count}", call["name"], ""))
            events.append(ToolCallEvent(self._count, None, None, json.dumps(call["arguments"])))
            self._count += 1
            self._buffer, self._inside = self._buffer[end + len("</tool_call>") :], False

    def finish(self) -> list[Any]:
        rest, self._buffer = self._buffer, ""
        return [TextEvent(rest)] if rest and not self._inside else []


class ThinkParser:
    """Splits `<think>...</think>`; text before the end tag is reasoning when starting inside."""

    def __init__(self, reasoning_format: Any, starts_inside: bool) -> None:
        self._inside = starts_inside
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning, content = "", ""
        while True:
            tag = "</think>" if self._inside else "<think>"
            position = self._buffer.find(tag)
            if position < 0:
                keep = _partial_suffix(self._buffer, tag)
                released, self._buffer = (
                    self._buffer[: len(self._buffer) - keep],
                    self._buffer[len(self._buffer) - keep :],
                )
                if self._inside:
                    reasoning += released
                else:
                    content += released
                return reasoning, content
            if self._inside:
                reasoning += self._buffer[:position]
            else:
                content += self._buffer[:position]
            self._buffer, self._inside = self._buffer[position + len(tag) :], not self._inside

    def flush(self) -> tuple[str, str]:
        rest, self._buffer = self._buffer, ""
        return (rest, "") if self._inside else ("", rest)


FORCED_GRAMMAR = 'start: "<tool_call>" /[a-z{}":, ]+/ "</tool_call>"'


def fake_chat_parsing(grammar_calls: list[tuple[Any, ...]] | None = None) -> ChatParsing:
    def forced_grammar(
        name: str, tools: Sequence[dict[str, Any]], function_name: str | None, *, allow_parallel: bool
    ) -> str:
        if grammar_calls is not None:
            grammar_calls.append((name, list(tools), function_name, allow_parallel))
        return FORCED_GRAMMAR

    return ChatParsing(
        detect_tool_parser=lambda template: "hermes" if template and "<tool_call>" in template else None,
        create_tool_parser=lambda name, tools: HermesParser(),
        forced_tool_call_grammar=forced_grammar,
        detect_reasoning=lambda template, tokenizer: (
            SimpleNamespace(start="<think>", end="</think>") if template and "<think>" in template else None
        ),
        create_reasoning_parser=ThinkParser,
        prompt_opens_reasoning=lambda fmt, tail: prompt_ends_inside_tags(fmt.start, fmt.end, tail),
    )


# ---- a servicer on a loopback server ----


@dataclass
class RunningServer:
    stub: generation_pb2_grpc.GenerationServiceStub
    servicer: GenerationServicer
    server: grpc.aio.Server
    channel: grpc.aio.Channel


async def start_server(
    engine: FakeEngine,
    *,
    config: ServerConfig | None = None,
    parsing: ChatParsing | None = None,
    processor: Any = None,
    tokenizer: Any = None,
    metrics: Any = None,
) -> RunningServer:
    registry = ModelRegistry([served_model(engine, tokenizer=tokenizer, processor=processor)])
    servicer = GenerationServicer(
        registry, config or server_config(), metrics, chat_parsing=parsing or fake_chat_parsing()
    )
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return RunningServer(generation_pb2_grpc.GenerationServiceStub(channel), servicer, server, channel)


async def stop_server(running: RunningServer) -> None:
    await running.channel.close()
    await running.server.stop(None)
