"""Fixtures of the agent tests: a folder for `list_files`, the test MCP server over stdio (a
subprocess) and over streamable HTTP (uvicorn in the test's event loop, on a free loopback port)."""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

pytest.importorskip("mcp")

SERVER_SCRIPT = Path(__file__).with_name("mcp_test_server.py")


@pytest.fixture
def served_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "served"
    (folder / "notes").mkdir(parents=True)
    (folder / "alpha.txt").write_text("a")
    (folder / "beta.txt").write_text("b")
    (folder / "notes" / "todo.md").write_text("t")
    return folder


@pytest.fixture
def call_log(tmp_path: Path) -> Path:
    """One JSON line per tool call that really ran, from every test MCP server."""
    return tmp_path / "calls.jsonl"


def read_call_log(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture
def stdio_command(served_folder: Path, call_log: Path) -> Callable[..., str]:
    """The command line that starts the test MCP server over stdio (`name` is the server's name)."""

    def command(name: str = "calculator") -> str:
        words = [sys.executable, str(SERVER_SCRIPT), str(served_folder), "--name", name, "--log", str(call_log)]
        return shlex.join(words)

    return command


@pytest.fixture
def server_stderr(tmp_path: Path) -> Iterator[TextIO]:
    """Where the MCP subprocesses' stderr goes (a real file: subprocesses need a file descriptor)."""
    with (tmp_path / "mcp-stderr.log").open("w") as file:
        yield file


@pytest.fixture
async def http_mcp_url(served_folder: Path, call_log: Path) -> AsyncIterator[str]:
    """The test MCP server over streamable HTTP, served by uvicorn in this event loop."""
    uvicorn = pytest.importorskip("uvicorn")
    from .mcp_test_server import build_server

    app = build_server(served_folder, name="web-calculator", log=call_log).streamable_http_app()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        listener.close()
