"""POST /v1/chat/completions: streamed (SSE chunks) through Chat, or whole through ChatUnary."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from protoserve.translator.body import read_json_object
from protoserve.translator.mapping.chat_request import chat_request, stream_settings
from protoserve.translator.mapping.chat_response import ChatChunkBuilder, chat_completion
from protoserve.translator.mapping.common_response import new_id
from protoserve.translator.mapping.fields import Fields
from protoserve.translator.mapping.images import ImageBudget
from protoserve.translator.routes.streaming import relay
from protoserve.translator.state import call_options, config_of, upstream_of
from protoserve.v1.common_pb2 import Usage
from protoserve.v1.generation_pb2 import GenerationChunk


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = config_of(request)
    body = await read_json_object(request, config.max_body_bytes)
    options = call_options(request)
    chat = chat_request(body, options.request_id, ImageBudget(config.max_images, config.max_image_bytes))
    settings = stream_settings(Fields(body))
    upstream = upstream_of(request)
    completion_id = new_id("chatcmpl-")
    if not settings.stream:
        call = upstream.generation.ChatUnary(chat, metadata=options.metadata, timeout=options.timeout)
        result = await upstream.unary(call)
        return web.json_response(chat_completion(result, completion_id, chat.model, chat.sampling.logprobs))

    builder = ChatChunkBuilder(completion_id, chat.model, settings.include_usage, chat.sampling.logprobs)
    usage = Usage()

    def to_events(message: GenerationChunk) -> list[dict[str, Any]]:
        if message.HasField("usage"):
            usage.CopyFrom(message.usage)
        return builder.chunks(message)

    def finish() -> list[dict[str, Any]]:
        return [builder.usage_chunk(usage)] if settings.include_usage else []

    call = upstream.generation.Chat(chat, metadata=options.metadata, timeout=options.timeout)
    return await relay(request, upstream.stream(call), to_events, finish)
