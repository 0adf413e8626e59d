"""A fake protoserve gRPC server for the agent tests: `Chat` plays scripted replies, in order.

Each reply is a list of `GenerationChunk`s, built with `text_reply` and `tool_call_reply`. Tool-call
arguments are split over two deltas, as a real server streams them. Every `ChatRequest` received is
kept, so a test can check what the agent sent (messages, tools, tool_choice). When the script runs
out, `Chat` answers FAILED_PRECONDITION, so a loop that asks too often fails loudly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

Reply = list[generation_pb2.GenerationChunk]


def _chunk(choice: generation_pb2.ChoiceDelta, *, last: bool = False) -> generation_pb2.GenerationChunk:
    chunk = generation_pb2.GenerationChunk(request_id="fake", model="fake-model", created=1, choices=[choice])
    if last:
        chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15))
    return chunk


def text_reply(*pieces: str) -> Reply:
    """A plain answer streamed as `pieces`, finishing with STOP."""
    chunks = [_chunk(generation_pb2.ChoiceDelta(index=0, text=piece)) for piece in pieces]
    chunks.append(_chunk(generation_pb2.ChoiceDelta(index=0, finish_reason=common_pb2.FINISH_REASON_STOP), last=True))
    return chunks


def tool_call_reply(calls: Sequence[tuple[str, str, str]], *, text: str = "") -> Reply:
    """Calls (id, name, arguments JSON text), each streamed as a head delta and two argument pieces."""
    chunks = [_chunk(generation_pb2.ChoiceDelta(index=0, text=text))] if text else []
    for index, (call_id, name, arguments) in enumerate(calls):
        middle = len(arguments) // 2
        pieces = [
            generation_pb2.ToolCallDelta(index=index, id=call_id, name=name),
            generation_pb2.ToolCallDelta(index=index, arguments=arguments[:middle]),
            generation_pb2.ToolCallDelta(index=index, arguments=arguments[middle:]),
        ]
        chunks.extend(_chunk(generation_pb2.ChoiceDelta(index=0, tool_calls=[piece])) for piece in pieces)
    finish = generation_pb2.ChoiceDelta(index=0, finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS)
    chunks.append(_chunk(finish, last=True))
    return chunks


@dataclass
class ScriptedChatServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Answers each Chat call with the next scripted reply and records the request."""

    replies: list[Reply]
    requests: list[generation_pb2.ChatRequest] = field(default_factory=list)

    async def Chat(
        self, request: generation_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerationChunk]:
        self.requests.append(request)
        if not self.replies:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the fake server's script has no more replies")
        for chunk in self.replies.pop(0):
            yield chunk


@dataclass
class FakeProtoserve:
    servicer: ScriptedChatServicer
    server: grpc.aio.Server
    address: str

    @property
    def requests(self) -> list[generation_pb2.ChatRequest]:
        return self.servicer.requests

    async def stop(self) -> None:
        await self.server.stop(None)


async def start_fake_protoserve(replies: Sequence[Reply]) -> FakeProtoserve:
    servicer = ScriptedChatServicer(list(replies))
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return FakeProtoserve(servicer, server, f"127.0.0.1:{port}")


def message_text(message: generation_pb2.ChatMessage) -> str:
    return "".join(part.text for part in message.content)
