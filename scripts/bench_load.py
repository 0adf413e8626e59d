"""Closed-loop streamed load against an OpenAI-compatible server or protoserve's gRPC API.

Each of `concurrency` workers sends one streamed chat request, waits for its last token, then sends
the next, until `num_requests` have finished. Per request it records the time to the first content
token and the gaps between later content chunks. Used by scripts/bench.py and the soak tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import aiohttp


@dataclass
class RequestTiming:
    """What one request took."""

    ttft_s: float
    total_s: float
    output_tokens: int
    inter_token_s: list[float] = field(default_factory=list)
    error: str | None = None
    prompt_tokens: int | None = None  # from usage, when the server reports it


@dataclass
class LoadResult:
    """Aggregate figures of one load level."""

    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    itl_p50_s: float
    itl_p90_s: float
    tokens_per_request: float  # mean generated tokens of a finished request: checks the forced length
    prompt_tokens: int | None = None
    first_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of the values lie (nearest rank); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[rank]


def summarize(concurrency: int, timings: list[RequestTiming], wall_s: float) -> LoadResult:
    ok = [t for t in timings if t.error is None]
    errors = [t for t in timings if t.error is not None]
    tokens = sum(t.output_tokens for t in ok)
    gaps = [gap for t in ok for gap in t.inter_token_s]
    return LoadResult(
        concurrency=concurrency,
        requests=len(ok),
        errors=len(errors),
        wall_s=wall_s,
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        ttft_p50_s=percentile([t.ttft_s for t in ok], 0.5),
        ttft_p90_s=percentile([t.ttft_s for t in ok], 0.9),
        itl_p50_s=percentile(gaps, 0.5) if gaps else float("nan"),
        itl_p90_s=percentile(gaps, 0.9) if gaps else float("nan"),
        tokens_per_request=tokens / len(ok) if ok else 0.0,
        prompt_tokens=max((t.prompt_tokens for t in ok if t.prompt_tokens is not None), default=None),
        first_error=errors[0].error if errors else None,
    )


async def run_closed_loop(
    one_request: Callable[[], Awaitable[RequestTiming]], concurrency: int, num_requests: int
) -> LoadResult:
    """Run `num_requests` calls of `one_request` with `concurrency` in flight at a time."""
    remaining = num_requests
    timings: list[RequestTiming] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            timings.append(await one_request())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(concurrency, timings, time.perf_counter() - started)


async def openai_chat_stream(session: aiohttp.ClientSession, base_url: str, body: dict[str, object]) -> RequestTiming:
    """One streamed chat completion. Output tokens come from usage when the server sends it, else
    one per content chunk (transformers serve streams one token a chunk), never from the request."""
    started = time.perf_counter()
    first: float | None = None
    last = started
    gaps: list[float] = []
    chunks = 0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    try:
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                return RequestTiming(0.0, 0.0, 0, error=f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    return RequestTiming(0.0, 0.0, 0, error=str(event["error"])[:200])
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                    prompt_tokens = event["usage"].get("prompt_tokens")
                for choice in event.get("choices", []):
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        chunks += 1
    except (TimeoutError, aiohttp.ClientError) as error:
        return RequestTiming(0.0, 0.0, 0, error=f"{type(error).__name__}: {error}")
    total = time.perf_counter() - started
    tokens = usage_tokens if usage_tokens is not None else chunks
    return RequestTiming(
        ttft_s=(first or total) - started,
        total_s=total,
        output_tokens=tokens,
        inter_token_s=gaps,
        prompt_tokens=prompt_tokens,
    )


async def grpc_chat_stream(stub: object, request: object) -> RequestTiming:
    """One streamed Chat call on protoserve's gRPC API (stub: GenerationServiceStub on an aio channel)."""
    import grpc

    started = time.perf_counter()
    first: float | None = None
    last = started
    gaps: list[float] = []
    tokens = 0
    prompt_tokens: int | None = None
    try:
        async for chunk in stub.Chat(request):  # type: ignore[attr-defined]
            for choice in chunk.choices:
                if choice.token_ids:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                    tokens += len(choice.token_ids)
            if chunk.HasField("usage"):
                tokens = chunk.usage.completion_tokens
                prompt_tokens = chunk.usage.prompt_tokens
    except grpc.aio.AioRpcError as error:
        return RequestTiming(0.0, 0.0, 0, error=f"{error.code().name}: {error.details()}")
    total = time.perf_counter() - started
    return RequestTiming(
        ttft_s=(first or total) - started,
        total_s=total,
        output_tokens=tokens,
        inter_token_s=gaps,
        prompt_tokens=prompt_tokens,
    )


def describe(result: LoadResult) -> str:
    """One line for logs."""
    return (
        f"c={result.concurrency:<3} {result.output_tokens_per_s:8.1f} tok/s {result.requests_per_s:6.2f} req/s "
        f"TTFT p50 {result.ttft_p50_s:6.3f}s p90 {result.ttft_p90_s:6.3f}s "
        f"ITL p50 {result.itl_p50_s * 1000:7.1f}ms p90 {result.itl_p90_s * 1000:7.1f}ms errors {result.errors}"
        + (f" ({result.first_error})" if result.first_error else "")
    )
