"""POST /v1/responses: the Responses API over Chat (streamed events) or ChatUnary (one object)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from protoserve.translator.body import read_json_object
from protoserve.translator.errors import ApiError
from protoserve.translator.mapping.common_response import new_id
from protoserve.translator.mapping.fields import Fields
from protoserve.translator.mapping.images import ImageBudget
from protoserve.translator.mapping.responses_request import request_echo, responses_chat_request
from protoserve.translator.mapping.responses_response import ResponseEventBuilder, response_from_result
from protoserve.translator.routes.streaming import relay
from protoserve.translator.state import call_options, config_of, upstream_of
from protoserve.v1.generation_pb2 import GenerationChunk


async def responses(request: web.Request) -> web.StreamResponse:
    config = config_of(request)
    body = await read_json_object(request, config.max_body_bytes)
    options = call_options(request)
    chat = responses_chat_request(body, options.request_id, ImageBudget(config.max_images, config.max_image_bytes))
    stream = bool(Fields(body).optional_bool("stream"))
    echo = request_echo(body)
    upstream = upstream_of(request)
    response_id = new_id("resp_")
    if not stream:
        call = upstream.generation.ChatUnary(chat, metadata=options.metadata, timeout=options.timeout)
        result = await upstream.unary(call)
        return web.json_response(response_from_result(result, response_id, chat.model, echo))

    builder = ResponseEventBuilder(response_id, chat.model, echo)

    def to_events(message: GenerationChunk) -> list[dict[str, Any]]:
        return builder.events(message)

    def on_error(error: ApiError) -> dict[str, Any]:
        return builder.error_event(error.body())

    call = upstream.generation.Chat(chat, metadata=options.metadata, timeout=options.timeout)
    return await relay(
        request,
        upstream.stream(call),
        to_events,
        builder.finish,
        named_events=True,
        done_marker=False,
        on_error=on_error,
    )
