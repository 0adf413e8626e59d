"""Small REST and gRPC clients for the reliability tests: they report what happened instead of raising."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import grpc.aio
from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@dataclass
class StreamOutcome:
    """One streamed chat over REST: the HTTP status, the text, and how the stream ended."""

    status: int
    text: str = ""
    chunks: int = 0
    done: bool = False  # saw `data: [DONE]`
    error_event: dict[str, Any] | None = None
    body: str = ""  # the body of a non-200 answer
    usage: dict[str, Any] | None = None


def unlimited_session(timeout_s: float = 120.0) -> aiohttp.ClientSession:
    """A session that opens as many connections as asked (aiohttp's default caps them at 100)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


async def streamed_chat(
    session: aiohttp.ClientSession, base_url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> StreamOutcome:
    """POST a streamed chat and read it to the end."""
    async with session.post(f"{base_url}/chat/completions", json=body, headers=headers) as response:
        if response.status != 200:
            return StreamOutcome(response.status, body=await response.text())
        outcome = StreamOutcome(200)
        async for raw_line in response.content:
            line = raw_line.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                outcome.done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                outcome.error_event = event["error"]
                continue
            outcome.chunks += 1
            if event.get("usage"):
                outcome.usage = event["usage"]
            for choice in event.get("choices", []):
                outcome.text += choice.get("delta", {}).get("content") or ""
        return outcome


@dataclass
class GrpcOutcome:
    """One gRPC Generate call: token ids received and the status it ended with."""

    token_ids: list[int] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


def greedy_generate_request(prompt_ids: list[int], max_tokens: int, **sampling: Any) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt_ids),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **sampling),
    )


async def generate_tokens(
    stub: generation_pb2_grpc.GenerationServiceStub,
    request: generation_pb2.GenerateRequest,
    timeout_s: float | None = 60.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> GrpcOutcome:
    """Stream a Generate call, collecting choice 0's token ids; errors become the outcome's code."""
    outcome = GrpcOutcome()
    try:
        async for chunk in stub.Generate(request, timeout=timeout_s, metadata=metadata):
            for choice in chunk.choices:
                if choice.index == 0:
                    outcome.token_ids.extend(choice.token_ids)
    except grpc.aio.AioRpcError as error:
        outcome.code = error.code()
        outcome.details = error.details() or ""
    return outcome
