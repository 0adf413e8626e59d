"""Scale-out: replicas as separate server processes behind one multi-address target.

The client and the translator balance calls round-robin over every address of the target, so both
replicas serve. When a replica dies, generation streams on it end with UNAVAILABLE at once (they are
not retried: running them twice would be wrong), idempotent calls are retried on the survivor, and
new calls go to the survivor.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from protoserve.client import AsyncProtoserveClient, Delta, Unavailable
from protoserve.client.async_stream import AsyncStream
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.server import start_translator

from deploy.processes import (
    ChildProcess,
    build_tiny_chat_model,
    child_environment,
    free_port,
    prometheus_samples,
    serve_command,
)

CALL_TIMEOUT_SECONDS = 30.0


@dataclass
class Replica:
    process: ChildProcess
    grpc_port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def streams_in_progress(self) -> float:
        """Generate and Chat streams this replica is serving now, from its Prometheus gauge."""
        pattern = re.compile(r'protoserve_requests_in_progress\{.*rpc="[^"]*(Generate|Chat)".*\}')
        return sum(value for name, value in prometheus_samples(self.metrics_port).items() if pattern.fullmatch(name))

    def finished_requests(self, rpc: str) -> float:
        """How many `rpc` calls this replica finished, from its Prometheus counter."""
        pattern = re.compile(r'protoserve_requests_total\{.*rpc="[^"]*' + rpc + r'".*\}')
        return sum(value for name, value in prometheus_samples(self.metrics_port).items() if pattern.fullmatch(name))


def start_replica(model_folder: Path, log_folder: Path, name: str) -> Replica:
    grpc_port, metrics_port = free_port(), free_port()
    command = serve_command(model_folder, grpc_port, metrics_port, "--drain-grace", "2")
    return Replica(ChildProcess.start(name, command, child_environment(), log_folder), grpc_port, metrics_port)


def multi_address_target(*replicas: Replica) -> str:
    return "ipv4:" + ",".join(replica.address for replica in replicas)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("scale-out") / "tiny")


@pytest.fixture(scope="module")
def replicas(model_folder: Path) -> Iterator[tuple[Replica, Replica]]:
    log_folder = model_folder.parent
    first = start_replica(model_folder, log_folder, "replica-a")
    second = start_replica(model_folder, log_folder, "replica-b")
    try:
        for replica in (first, second):
            replica.process.wait_serving(replica.address)
        yield first, second
    finally:
        first.process.stop()
        second.process.stop()


def finished_counts(replicas: tuple[Replica, ...], rpc: str) -> list[float]:
    return [replica.finished_requests(rpc) for replica in replicas]


def served_since(before: list[float], replicas: tuple[Replica, ...], rpc: str) -> list[float]:
    return [now - then for now, then in zip(finished_counts(replicas, rpc), before, strict=True)]


async def until_every_replica_answered(
    send: Callable[[], Awaitable[object]], replicas: tuple[Replica, ...], rpc: str
) -> None:
    """Send calls until each replica has answered one: round robin picks only connected replicas,
    and a fresh channel connects to them one after another."""
    before = finished_counts(replicas, rpc)
    deadline = time.monotonic() + CALL_TIMEOUT_SECONDS
    while min(served_since(before, replicas, rpc)) == 0:
        assert time.monotonic() < deadline, "a replica never became reachable through the channel"
        await send()


async def test_round_robin_spreads_generation_over_both_replicas(replicas: tuple[Replica, Replica]) -> None:
    async with AsyncProtoserveClient(multi_address_target(*replicas), timeout=CALL_TIMEOUT_SECONDS) as client:
        await until_every_replica_answered(lambda: client.generate("w1", max_tokens=1), replicas, "GenerateUnary")
        before = finished_counts(replicas, "GenerateUnary")
        replies = await asyncio.gather(
            *(client.generate(f"w{index} w3 w5", max_tokens=4, ignore_eos=True) for index in range(40))
        )
    assert all(reply.usage.completion_tokens == 4 for reply in replies)
    served = served_since(before, replicas, "GenerateUnary")
    assert sum(served) == 40
    assert min(served) >= 15, f"round robin did not share the calls: {served}"


async def test_a_dns_target_reaches_a_replica(replicas: tuple[Replica, Replica]) -> None:
    """`dns:///NAME:PORT` goes through gRPC's resolver (here `localhost` has one address)."""
    async with AsyncProtoserveClient(f"dns:///localhost:{replicas[0].grpc_port}", timeout=10) as client:
        assert await client.health()
        assert [model.id for model in await client.models()] == ["tiny"]


@pytest.fixture
async def translator_url(replicas: tuple[Replica, Replica]) -> AsyncIterator[str]:
    translator = await start_translator(TranslatorConfig(upstream=multi_address_target(*replicas)))
    try:
        yield translator.url
    finally:
        await translator.stop()


async def test_the_translator_balances_over_every_upstream_address(
    replicas: tuple[Replica, Replica], translator_url: str
) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 3}
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{translator_url}/health") as health:
            assert health.status == 200

        async def complete() -> int:
            async with session.post(f"{translator_url}/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
                return int(json.loads(await response.text())["usage"]["completion_tokens"])

        await until_every_replica_answered(complete, replicas, "ChatUnary")
        before = finished_counts(replicas, "ChatUnary")
        completions = await asyncio.gather(*(complete() for _ in range(20)))
    assert all(tokens >= 1 for tokens in completions)
    served = served_since(before, replicas, "ChatUnary")
    assert sum(served) == 20 and min(served) >= 7, served


LONG_STREAM_TOKENS = 1900


async def _read_grpc_until_cut(stream: AsyncStream[Delta]) -> float:
    """Read a gRPC stream to its end; returns when it ended with UNAVAILABLE (monotonic seconds)."""
    try:
        async for _delta in stream:
            pass
    except Unavailable:
        return time.monotonic()
    raise AssertionError("a long stream finished while the test expected it to be running or cut")


async def _read_sse_until_cut(response: aiohttp.ClientResponse) -> float:
    """Read an SSE stream to `[DONE]`; returns when it ended with an error event (monotonic seconds)."""
    error: dict[str, object] | None = None
    async for raw_line in response.content:
        line = raw_line.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            error = json.loads(line.removeprefix("data: ")).get("error", error)
    assert error is not None, "a long SSE stream finished while the test expected it to be running or cut"
    assert "unavailable" in json.dumps(error).lower() or "503" in json.dumps(error), error
    return time.monotonic()


async def _wait_for_endings(
    readers: list[asyncio.Future[float]], count: int, timeout: float
) -> tuple[set[asyncio.Future[float]], set[asyncio.Future[float]]]:
    """Wait until `count` readers have ended or `timeout` passed; returns (ended, still running)."""
    deadline = time.monotonic() + timeout
    done: set[asyncio.Future[float]] = set()
    running = set(readers)
    while len(done) < count and running and time.monotonic() < deadline:
        finished, running = await asyncio.wait(
            running, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
        )
        done |= finished
    return done, running


async def test_killing_a_replica_mid_run(replicas: tuple[Replica, Replica], model_folder: Path) -> None:
    """Four gRPC streams and four SSE streams through a translator, spread over two replicas; one dies."""
    survivor = replicas[0]
    doomed = start_replica(model_folder, model_folder.parent, "replica-doomed")
    translator = None
    try:
        await asyncio.to_thread(doomed.process.wait_serving, doomed.address)
        target = multi_address_target(survivor, doomed)
        translator = await start_translator(TranslatorConfig(upstream=target))
        chat_url = f"{translator.url}/v1/chat/completions"
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS)
        async with (
            AsyncProtoserveClient(target, timeout=CALL_TIMEOUT_SECONDS) as client,
            aiohttp.ClientSession(timeout=timeout) as session,
        ):

            async def chat_unary() -> None:
                body = {"model": "tiny", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 1}
                async with session.post(chat_url, json=body) as response:
                    assert response.status == 200, await response.text()

            both = (survivor, doomed)
            await until_every_replica_answered(lambda: client.generate("w1", max_tokens=1), both, "GenerateUnary")
            await until_every_replica_answered(chat_unary, both, "ChatUnary")

            streams = [
                client.generate(f"w{index} w9", stream=True, max_tokens=LONG_STREAM_TOKENS, ignore_eos=True)
                for index in range(4)
            ]
            for stream in streams:  # every stream is running: its first token arrived
                await asyncio.wait_for(stream.__anext__(), CALL_TIMEOUT_SECONDS)
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "w2"}],
                "max_tokens": LONG_STREAM_TOKENS,
                "ignore_eos": True,
                "stream": True,
            }
            responses = [await session.post(chat_url, json=body) for _ in range(4)]
            for response in responses:
                assert response.status == 200
                await asyncio.wait_for(response.content.readline(), CALL_TIMEOUT_SECONDS)
            total = len(streams) + len(responses)
            on_doomed = int(doomed.streams_in_progress())
            assert on_doomed >= 2 and survivor.streams_in_progress() == total - on_doomed
            readers: list[asyncio.Future[float]] = [
                *(asyncio.ensure_future(_read_grpc_until_cut(stream)) for stream in streams),
                *(asyncio.ensure_future(_read_sse_until_cut(response)) for response in responses),
            ]
            doomed.process.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            done, running = await _wait_for_endings(readers, on_doomed, timeout=5.0)
            # Exactly the dead replica's streams ended, with UNAVAILABLE, within seconds; the others run on.
            cut_after = sorted(reader.result() - killed_at for reader in done)
            assert len(cut_after) == on_doomed and len(running) == total - on_doomed, cut_after
            assert survivor.streams_in_progress() == len(running)
            for reader in running:
                reader.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            for stream in streams:
                await stream.aclose()
            for response in responses:
                response.close()

            # Idempotent calls are retried onto the survivor; new generation goes there too.
            for _ in range(6):
                assert [model.id for model in await client.models()] == ["tiny"]
                assert await client.health()
            replies = await asyncio.gather(*(client.generate("w4 w5", max_tokens=2) for _ in range(10)))
            assert len(replies) == 10
            await asyncio.gather(*(chat_unary() for _ in range(6)))
    finally:
        if translator is not None:
            await translator.stop()
        doomed.process.stop()
    assert doomed.process.process.returncode == -signal.SIGKILL
