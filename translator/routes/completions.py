"""POST /v1/completions (legacy): streamed through Generate, or whole through GenerateUnary."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from protoserve.translator.body import read_json_object
from protoserve.translator.mapping.chat_request import stream_settings
from protoserve.translator.mapping.common_response import new_id
from protoserve.translator.mapping.completions import CompletionChunkBuilder, generate_request, text_completion
from protoserve.translator.mapping.fields import Fields
from protoserve.translator.routes.streaming import relay
from protoserve.translator.state import call_options, config_of, upstream_of
from protoserve.v1.common_pb2 import Usage
from protoserve.v1.generation_pb2 import GenerationChunk


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request, config_of(request).max_body_bytes)
    options = call_options(request)
    generate = generate_request(body, options.request_id)
    settings = stream_settings(Fields(body))
    upstream = upstream_of(request)
    completion_id = new_id("cmpl-")
    with_logprobs = generate.sampling.logprobs
    if not settings.stream:
        call = upstream.generation.GenerateUnary(generate, metadata=options.metadata, timeout=options.timeout)
        result = await upstream.unary(call)
        return web.json_response(text_completion(result, completion_id, generate.model, with_logprobs))

    builder = CompletionChunkBuilder(completion_id, generate.model, settings.include_usage, with_logprobs)
    usage = Usage()

    def to_events(message: GenerationChunk) -> list[dict[str, Any]]:
        if message.HasField("usage"):
            usage.CopyFrom(message.usage)
        return builder.chunks(message)

    def finish() -> list[dict[str, Any]]:
        return [builder.usage_chunk(usage)] if settings.include_usage else []

    call = upstream.generation.Generate(generate, metadata=options.metadata, timeout=options.timeout)
    return await relay(request, upstream.stream(call), to_events, finish)
