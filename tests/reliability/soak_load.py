"""The mixed workload of the soak test: each worker loops over request kinds until time is up.

Every kind is a real client call through the translator (REST) or to the server (gRPC). A kind
that is meant to be abandoned (a client timeout) counts as `cancelled`, not as an error.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import grpc
import grpc.aio
from protoserve.v1 import generation_pb2_grpc

from reliability.clients import chat_body, generate_tokens, greedy_generate_request, streamed_chat

MAX_TOKENS = 16


@dataclass
class SoakTally:
    completed: Counter[str] = field(default_factory=Counter)
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class SoakTargets:
    base_url: str
    grpc_target: str
    model: str


async def _stream(session: aiohttp.ClientSession, targets: SoakTargets, index: int) -> str | None:
    outcome = await streamed_chat(
        session, targets.base_url, chat_body(targets.model, f"Count to {index % 9}.", MAX_TOKENS)
    )
    ok = outcome.status == 200 and outcome.done and outcome.error_event is None and outcome.usage is not None
    return None if ok else f"stream: {outcome.status} {outcome.body or outcome.error_event}"


async def _unary(session: aiohttp.ClientSession, targets: SoakTargets, index: int) -> str | None:
    body = chat_body(targets.model, "Name a colour.", MAX_TOKENS, stream=False, n=2, temperature=0.7, seed=index,
                     logprobs=True, top_logprobs=2)  # fmt: skip
    async with session.post(f"{targets.base_url}/chat/completions", json=body) as response:
        if response.status != 200:
            return f"unary: {response.status} {await response.text()}"
        reply = await response.json()
        return None if len(reply["choices"]) == 2 else f"unary: {reply}"


async def _json_mode(session: aiohttp.ClientSession, targets: SoakTargets, index: int) -> str | None:
    body = chat_body(targets.model, "Give a city as JSON.", 24, stream=False, response_format={"type": "json_object"})
    async with session.post(f"{targets.base_url}/chat/completions", json=body) as response:
        return None if response.status == 200 else f"json: {response.status} {await response.text()}"


async def _completion_and_models(session: aiohttp.ClientSession, targets: SoakTargets, index: int) -> str | None:
    body = {"model": targets.model, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0}
    async with session.post(f"{targets.base_url}/completions", json=body) as response:
        if response.status != 200:
            return f"completion: {response.status} {await response.text()}"
    async with session.get(f"{targets.base_url}/models") as response:
        return None if response.status == 200 else f"models: {response.status}"


async def _abandoned(session: aiohttp.ClientSession, targets: SoakTargets, index: int) -> str | None:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as impatient:
            await streamed_chat(impatient, targets.base_url, chat_body(targets.model, "Write a long poem.", 200))
    except TimeoutError:
        return "cancelled"
    return None


RestKind = Callable[[aiohttp.ClientSession, SoakTargets, int], Awaitable[str | None]]
REST_KINDS: list[tuple[str, RestKind]] = [
    ("stream", _stream), ("unary_n2_logprobs", _unary), ("json_mode", _json_mode),
    ("completion_and_models", _completion_and_models), ("stream", _stream), ("abandoned", _abandoned),
]  # fmt: skip


async def _grpc_worker(targets: SoakTargets, deadline: float, tally: SoakTally) -> None:
    async with grpc.aio.insecure_channel(targets.grpc_target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for index in itertools.count():
            if time.monotonic() > deadline:
                return
            request = greedy_generate_request([1 + index % 50, 2, 3, 4], MAX_TOKENS)
            request.model = targets.model
            outcome = await generate_tokens(stub, request)
            if outcome.code == grpc.StatusCode.OK:
                tally.completed["grpc_generate"] += 1
            else:
                tally.errors.append(f"grpc: {outcome.code} {outcome.details}")


async def _rest_worker(worker: int, targets: SoakTargets, deadline: float, tally: SoakTally) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for index in itertools.count(worker):
            if time.monotonic() > deadline:
                return
            name, kind = REST_KINDS[index % len(REST_KINDS)]
            problem = await kind(session, targets, index)
            if problem == "cancelled":
                tally.cancelled += 1
            elif problem is None:
                tally.completed[name] += 1
            else:
                tally.errors.append(problem)


async def run_mixed_load(targets: SoakTargets, seconds: float, rest_workers: int, tally: SoakTally) -> None:
    """Run the mixed workload for `seconds` with `rest_workers` REST workers and one gRPC worker."""
    deadline = time.monotonic() + seconds
    workers = [_rest_worker(worker, targets, deadline, tally) for worker in range(rest_workers)]
    await asyncio.gather(*workers, _grpc_worker(targets, deadline, tally))
