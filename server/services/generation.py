"""GenerationService: Generate and Chat (streamed and unary) and Tokenize over one engine per model.

Every call follows the same path: validate and convert the request (`convert.py`, `chat/`), build
one `EngineRequest`, iterate the engine's outputs, and send one `GenerationChunk` per engine output
with each choice's deltas (text, reasoning, token ids, logprobs, tool-call pieces, finish reason);
the last chunk carries usage. Unary calls fold the same chunks (`convert.result_from_chunks`), so a
unary reply always equals its joined stream.

Cancellation: when the caller cancels or its deadline passes, grpc.aio cancels the handler; the
engine's output iterator is closed on the way out (`aclosing`), which aborts the engine request and
frees its KV blocks. The caller sees CANCELLED or DEADLINE_EXCEEDED from gRPC itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc.aio
from protoserve.server.chat.composer import ChoiceComposer, ComposedText
from protoserve.server.chat.parsing_hooks import ChatParsing, default_chat_parsing
from protoserve.server.chat.prompt import prepare_chat_prompt
from protoserve.server.convert import (
    TokenText,
    check_prompt_token_ids,
    choice_delta_to_proto,
    request_identity,
    response_format_from_proto,
    result_from_chunks,
    sampling_params_from_proto,
    usage_to_proto,
)
from protoserve.server.engine.api import EngineRequest, FinishReason, MultimodalInputs, SamplingParams
from protoserve.server.engine.errors import InvalidRequestError, PromptTooLongError, RequestFailedError
from protoserve.server.errors import rpc_errors
from protoserve.server.metrics import ServerMetrics
from protoserve.server.request_log import new_request_id
from protoserve.v1 import generation_pb2, generation_pb2_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# Prompts longer than this many characters are tokenized in a worker thread, off the event loop.
THREAD_TOKENIZE_CHARS = 8192


@dataclass(frozen=True)
class PreparedGeneration:
    """Everything needed to run one request on the engine and read its output."""

    prompt_token_ids: list[int]
    params: SamplingParams
    new_composer: Callable[[], ChoiceComposer]
    multimodal: MultimodalInputs | None = None


def resolve_max_tokens(
    params: SamplingParams, prompt_tokens: int, context_length: int, default: int | None
) -> int | None:
    """max_tokens to hand the engine, or PromptTooLongError naming the numbers.

    An explicit max_tokens must fit next to the prompt. Without one, the server default (if any) is
    trimmed to the room left; None lets the engine generate up to the context length.
    """
    if params.max_tokens is not None:
        if prompt_tokens + params.max_tokens > context_length:
            raise PromptTooLongError(prompt_tokens, params.max_tokens, context_length)
        return params.max_tokens
    if prompt_tokens + 1 > context_length:
        raise PromptTooLongError(prompt_tokens, 1, context_length)
    return None if default is None else min(default, context_length - prompt_tokens)


def check_fits(params: SamplingParams, prompt_tokens: int, context_length: int) -> None:
    """Raise PromptTooLongError when the prompt leaves no room for the requested output."""
    resolve_max_tokens(params, prompt_tokens, context_length, None)


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate, GenerateUnary, Chat, ChatUnary and Tokenize.

    `chat_parsing` replaces the tool-call and reasoning parsers (tests); by default they are
    `protoserve.server.parsing`'s, loaded here, so a parser that cannot load fails startup instead
    of every chat request.
    """

    def __init__(
        self,
        registry: Any,
        config: Any,
        metrics: ServerMetrics | None = None,
        *,
        chat_parsing: ChatParsing | None = None,
    ) -> None:
        self._registry = registry
        self._config = config
        self._metrics = metrics or ServerMetrics()
        self._chat_parsing = chat_parsing or default_chat_parsing()
        self._token_texts: weakref.WeakKeyDictionary[Any, TokenText] = weakref.WeakKeyDictionary()
        self._engine_request_numbers = itertools.count()

    # ---- RPCs ----

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerationChunk]:
        async for chunk in self._serve(
            request.model, request.options, "Generate", context, self._prepare_generate(request)
        ):
            yield chunk

    async def GenerateUnary(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> generation_pb2.GenerationResult:
        prepare = self._prepare_generate(request)
        return result_from_chunks(
            [c async for c in self._serve(request.model, request.options, "GenerateUnary", context, prepare)]
        )

    async def Chat(
        self, request: generation_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerationChunk]:
        async for chunk in self._serve(request.model, request.options, "Chat", context, self._prepare_chat(request)):
            yield chunk

    async def ChatUnary(self, request: generation_pb2.ChatRequest, context: Context) -> generation_pb2.GenerationResult:
        prepare = self._prepare_chat(request)
        return result_from_chunks(
            [c async for c in self._serve(request.model, request.options, "ChatUnary", context, prepare)]
        )

    async def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: Context
    ) -> generation_pb2.TokenizeResponse:
        request_id = new_request_id()
        label = self._registry.metrics_label(request.model, "generation")
        async with rpc_errors(context, request_id), self._metrics.observe(label, "Tokenize", context):
            served = await self._registry.generation_model(request.model)
            limits = self._config.limits
            context_length = served.engine.context_length
            kind = request.WhichOneof("input")
            if kind == "text":
                token_ids = await self._tokenize_text(served.loaded.tokenizer, request.text)
            elif kind == "messages":
                prompt = await prepare_chat_prompt(
                    generation_pb2.ChatRequest(messages=request.messages.messages),
                    served,
                    limits=limits,
                    image_policy=self._config.image_policy,
                    parsing=None,
                    tool_parser_setting="auto",
                    check_prompt_length=lambda prompt_tokens: None,
                )
                token_ids = prompt.token_ids
            else:
                raise InvalidRequestError("input is not set; give text or messages")
            token_text = self._token_text(served.loaded.tokenizer)
            response = generation_pb2.TokenizeResponse(
                token_ids=token_ids,
                tokens=[token_text.text_of(token_id) for token_id in token_ids],
                context_length=context_length,
            )
        return response

    # ---- request preparation ----

    def _prepare_generate(
        self, request: generation_pb2.GenerateRequest
    ) -> Callable[[Any], Awaitable[PreparedGeneration]]:
        async def prepare(served: Any) -> PreparedGeneration:
            tokenizer = served.loaded.tokenizer
            vocab_size = len(tokenizer)
            kind = request.WhichOneof("prompt")
            if kind == "text":
                token_ids = await self._tokenize_text(tokenizer, request.text)
                if not token_ids:
                    raise InvalidRequestError("text is empty and the tokenizer adds no tokens; give a prompt")
            elif kind == "token_ids":
                token_ids = list(request.token_ids.ids)
                check_prompt_token_ids(token_ids, vocab_size)
            else:
                raise InvalidRequestError("prompt is not set; give text or token_ids")
            params = await self._sampling_params(request.sampling, served)
            return PreparedGeneration(token_ids, params, ChoiceComposer)

        return prepare

    def _prepare_chat(self, request: generation_pb2.ChatRequest) -> Callable[[Any], Awaitable[PreparedGeneration]]:
        async def prepare(served: Any) -> PreparedGeneration:
            parsing = self._parsing()
            vocab_size = len(served.loaded.tokenizer)
            response_format = response_format_from_proto(request.sampling.response_format)
            # Validate sampling before the costly work; the real params are built once the prompt is known.
            unconstrained = sampling_params_from_proto(
                request.sampling, limits=self._config.limits, vocab_size=vocab_size
            )
            prompt = await prepare_chat_prompt(
                request,
                served,
                limits=self._config.limits,
                image_policy=self._config.image_policy,
                parsing=parsing,
                tool_parser_setting=self._config.tool_parser,
                check_prompt_length=lambda tokens: check_fits(unconstrained, tokens, served.engine.context_length),
            )
            if prompt.forced_tool_grammar is not None and response_format is not None:
                raise InvalidRequestError(
                    "sampling.response_format cannot be combined with tool_choice required or a named function: "
                    "a forced tool call already fixes the output's shape"
                )
            params = await self._sampling_params(request.sampling, served, grammar=prompt.forced_tool_grammar)
            return PreparedGeneration(prompt.token_ids, params, lambda: prompt.new_composer(parsing), prompt.multimodal)

        return prepare

    async def _sampling_params(
        self,
        sampling: Any,
        served: Any,
        *,
        grammar: str | None = None,
    ) -> SamplingParams:
        """Validated params with the output constraint, if any: the forced tool-call `grammar` when
        given (the caller has refused a response format alongside it), else the response format."""
        tokenizer = served.loaded.tokenizer
        response_format = None if grammar is not None else response_format_from_proto(sampling.response_format)
        constraint_factory = None
        if response_format is not None or grammar is not None:
            from protoserve.server.engine import constraints

            def build() -> Any:
                if grammar is not None:
                    return constraints.lark_grammar_constraint(tokenizer, grammar)
                assert response_format is not None
                if response_format.kind == "json_object":
                    return constraints.json_object_constraint(tokenizer)
                return constraints.json_schema_constraint(tokenizer, response_format.schema or {})

            constraint_factory = await asyncio.to_thread(build)
        return sampling_params_from_proto(
            sampling, limits=self._config.limits, vocab_size=len(tokenizer), constraint_factory=constraint_factory
        )

    async def _tokenize_text(self, tokenizer: Any, text: str) -> list[int]:
        limits = self._config.limits
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(f"text has {len(text)} characters; at most {limits.max_prompt_chars} allowed")
        if len(text) > THREAD_TOKENIZE_CHARS:
            return list(await asyncio.to_thread(tokenizer.encode, text))
        return list(tokenizer.encode(text))

    def _parsing(self) -> ChatParsing:
        return self._chat_parsing

    def _token_text(self, tokenizer: Any) -> TokenText:
        token_text = self._token_texts.get(tokenizer)
        if token_text is None:
            token_text = self._token_texts[tokenizer] = TokenText(tokenizer)
        return token_text

    # ---- running ----

    async def _serve(
        self,
        model: str,
        options: Any,
        rpc: str,
        context: Context,
        prepare: Callable[[Any], Awaitable[PreparedGeneration]],
    ) -> AsyncIterator[generation_pb2.GenerationChunk]:
        request_id = options.request_id or new_request_id()
        label = self._registry.metrics_label(model, "generation")
        async with rpc_errors(context, lambda: request_id), self._metrics.observe(label, rpc, context):
            request_id, priority = request_identity(options, self._config.limits)
            created = int(time.time())
            served = await self._registry.generation_model(model)
            model_id = served.description.id
            async with self._registry.lease(model_id):
                prepared = await prepare(served)
                max_tokens = resolve_max_tokens(
                    prepared.params,
                    len(prepared.prompt_token_ids),
                    served.engine.context_length,
                    self._config.limits.default_max_tokens,
                )
                engine_request = EngineRequest(
                    # Callers may reuse their ids across concurrent calls; the engine needs unique ones.
                    request_id=f"{request_id}/{next(self._engine_request_numbers)}",
                    prompt_token_ids=tuple(prepared.prompt_token_ids),
                    params=dataclasses.replace(prepared.params, max_tokens=max_tokens),
                    priority=priority,
                    multimodal=prepared.multimodal,
                )
                header = generation_pb2.GenerationChunk(request_id=request_id, model=model_id, created=created)
                async for chunk in self._stream(served, engine_request, prepared, header, label):
                    yield chunk

    async def _stream(
        self,
        served: Any,
        engine_request: EngineRequest,
        prepared: PreparedGeneration,
        header: generation_pb2.GenerationChunk,
        label: str,
    ) -> AsyncIterator[generation_pb2.GenerationChunk]:
        """One chunk per engine output; the engine iterator is closed (aborting it) if the caller leaves."""
        token_text = self._token_text(served.loaded.tokenizer)
        composers: dict[int, ChoiceComposer] = {}
        started = time.monotonic()
        last_token_at: float | None = None
        async with aclosing(served.engine.generate(engine_request)) as outputs:
            async for output in outputs:
                chunk = generation_pb2.GenerationChunk()
                chunk.CopyFrom(header)
                failed = False
                # A merged output (the caller fell behind) is parsed step by step, so that each
                # step's text keeps its own token count, then sent as one chunk.
                composed_by_index: dict[int, ComposedText] = {}
                for step in output.steps:
                    for delta in step.deltas:
                        composer = composers.get(delta.index)
                        if composer is None:
                            composer = composers[delta.index] = prepared.new_composer()
                        composed = composer.feed(delta.text, len(delta.token_ids))
                        if delta.finish_reason is not None:
                            composed.extend(composer.finish())
                        earlier = composed_by_index.get(delta.index)
                        if earlier is None:
                            composed_by_index[delta.index] = composed
                        else:
                            earlier.extend(composed)
                for delta in output.deltas:
                    failed = failed or delta.finish_reason is FinishReason.ERROR
                    chunk.choices.append(
                        choice_delta_to_proto(
                            delta,
                            composed_by_index[delta.index],
                            called_tools=composers[delta.index].called_tools,
                            token_text=token_text,
                        )
                    )
                if any(delta.token_ids for delta in output.deltas):
                    now = time.monotonic()
                    if last_token_at is None:
                        self._metrics.first_token(label, now - started)
                    else:
                        self._metrics.inter_token(label, now - last_token_at)
                    last_token_at = now
                if output.finished:
                    if output.usage is not None:
                        reasoning_tokens = sum(composer.reasoning_tokens for composer in composers.values())
                        chunk.usage.CopyFrom(usage_to_proto(output.usage, reasoning_tokens))
                        self._metrics.tokens(label, output.usage.prompt_tokens, output.usage.completion_tokens)
                yield chunk
                if failed:
                    raise RequestFailedError(f"the engine failed while generating request {engine_request.request_id}")
                if output.finished:
                    return
        raise RequestFailedError(
            f"the engine's output for request {engine_request.request_id} ended before it finished"
        )
