"""McpToolbox against the real test MCP server: stdio and streamable HTTP, names, errors, shutdown."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import pytest
from protoserve.client.agent.mcp_results import result_text
from protoserve.client.agent.mcp_toolbox import (
    McpConnectionError,
    McpServerSpec,
    McpToolbox,
    assign_tool_names,
)

from .conftest import read_call_log


async def test_stdio_and_http_servers_with_clashing_names(
    stdio_command: Callable[..., str], http_mcp_url: str, call_log: Path, server_stderr: TextIO
) -> None:
    async with AsyncExitStack() as stack:
        specs = [McpServerSpec.stdio(stdio_command()), McpServerSpec.http(http_mcp_url)]
        toolbox = await McpToolbox.connect(specs, stack, errlog=server_stderr)
        # Both servers offer the same three tools, so every name is prefixed with its server's name.
        assert toolbox.names() == [
            "calculator_add",
            "calculator_multiply",
            "calculator_list_files",
            "web-calculator_add",
            "web-calculator_multiply",
            "web-calculator_list_files",
        ]
        add = toolbox.openai_tools()[0]["function"]
        assert add["description"] == "Add two integers."
        assert add["parameters"]["required"] == ["a", "b"]
        assert add["parameters"]["properties"]["a"]["type"] == "integer"

        assert (await toolbox.call("calculator_add", {"a": 2, "b": 3})).text == "5"
        assert (await toolbox.call("web-calculator_multiply", {"a": 4, "b": 5})).text == "20"
        files = await toolbox.call("web-calculator_list_files", {"directory": "."})
        assert (files.text, files.is_error) == ("alpha.txt\nbeta.txt\nnotes", False)
        assert (await toolbox.call("calculator_list_files", {"directory": "notes"})).text == "todo.md"

        escape = await toolbox.call("calculator_list_files", {"directory": ".."})
        assert escape.is_error and "outside the served folder" in escape.text
        wrong_type = await toolbox.call("web-calculator_add", {"a": "two", "b": 3})
        assert wrong_type.is_error and "valid integer" in wrong_type.text
        unknown = await toolbox.call("subtract", {"a": 1})
        assert unknown.is_error and "no tool named 'subtract'" in unknown.text and "calculator_add" in unknown.text

    calls = [(entry["server"], entry["tool"]) for entry in read_call_log(call_log) if "tool" in entry]
    assert calls == [
        ("calculator", "add"),
        ("web-calculator", "multiply"),
        ("web-calculator", "list_files"),
        ("calculator", "list_files"),
        ("calculator", "list_files"),
    ]
    # Closing the stack stopped the stdio server's process.
    pid = next(entry["pid"] for entry in read_call_log(call_log) if "pid" in entry)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_one_server_keeps_plain_names(http_mcp_url: str) -> None:
    async with AsyncExitStack() as stack:
        toolbox = await McpToolbox.connect([McpServerSpec.http(http_mcp_url)], stack)
        assert toolbox.names() == ["add", "multiply", "list_files"]
        assert (await toolbox.call("add", {"a": -7, "b": 3})).text == "-4"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (McpServerSpec.stdio("/nonexistent/mcp-server --flag"), "/nonexistent/mcp-server"),
        (McpServerSpec.stdio(f"{sys.executable} -c 'raise SystemExit(3)'"), "SystemExit(3)"),
        (McpServerSpec.http("http://127.0.0.1:9/mcp"), "http://127.0.0.1:9/mcp"),
        (McpServerSpec.stdio(f"{sys.executable} -c 'import time; time.sleep(60)'"), "no answer in time"),
    ],
)
async def test_servers_that_cannot_be_used_are_named_in_the_error(
    spec: McpServerSpec, expected: str, server_stderr: TextIO
) -> None:
    with pytest.raises(McpConnectionError) as raised:
        async with AsyncExitStack() as stack:
            await McpToolbox.connect([spec], stack, connect_timeout=1.5, errlog=server_stderr)
    assert "cannot use MCP server" in str(raised.value) and expected in str(raised.value)


def test_bad_server_specs_are_refused() -> None:
    with pytest.raises(McpConnectionError, match="needs a command"):
        McpServerSpec.stdio("   ")
    with pytest.raises(McpConnectionError, match="not a valid command line"):
        McpServerSpec.stdio("python 'unclosed")
    with pytest.raises(McpConnectionError, match="http"):
        McpServerSpec.http("ftp://example.invalid/mcp")
    with pytest.raises(McpConnectionError, match="http"):
        McpServerSpec.http("127.0.0.1:8001")


def test_tool_names_are_valid_unique_and_prefixed_only_on_clashes() -> None:
    names = assign_tool_names(
        [
            ("files", "read"),
            ("files", "git.status"),
            ("git", "git_status"),
            ("web", "read"),
            ("web", "x" * 80),
            ("other", "x" * 80),
        ]
    )
    assert names[0] == "files_read" and names[3] == "web_read"
    assert names[1] == "git_status" and names[2] == "git_status_2"  # sanitised, then made unique
    assert all(len(name) <= 64 for name in names) and len(set(names)) == len(names)
    assert names[4].startswith("web_x") and names[5].startswith("other_x")


def test_tool_results_become_text() -> None:
    text = SimpleNamespace(type="text", text="hello")
    image = SimpleNamespace(type="image", data="QUJD", mime_type="image/png")
    link = SimpleNamespace(type="resource_link", uri="file:///a.txt")
    embedded = SimpleNamespace(type="resource", resource=SimpleNamespace(uri="file:///b", text="inside"))
    result = SimpleNamespace(content=[text, image, link, embedded], is_error=False)
    assert result_text(result) == (
        "hello\n[image content, image/png, 4 base64 characters, not shown]\n[resource file:///a.txt]\ninside",
        False,
    )
    structured = SimpleNamespace(content=[], structured_content={"result": 5}, is_error=None, isError=True)
    assert result_text(structured) == ('{"result": 5}', True)  # mcp 1.x spells it isError
    empty = SimpleNamespace(content=[], structured_content=None, is_error=False)
    assert result_text(empty) == ("(the tool returned nothing)", False)
    long = SimpleNamespace(content=[SimpleNamespace(type="text", text="y" * 50)], is_error=False)
    assert result_text(long, max_chars=10) == ("y" * 10 + "\n[... 40 more characters cut]", False)
