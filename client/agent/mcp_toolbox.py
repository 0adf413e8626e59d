"""Connections to MCP servers and their tools, under names the model can call.

A server is a stdio command (started as a subprocess) or a streamable-HTTP URL. `McpToolbox.connect`
opens every server's session on the caller's `AsyncExitStack`, so closing that stack (in the same
task) ends every session and stops every subprocess, whatever happened in between.

Naming: a tool keeps its own name unless another server offers the same name; then each clashing
tool is called `<server>_<name>`, `<server>` being the name the server reports (or `mcp<N>`).
Names are made to fit OpenAI's rule (1 to 64 letters, digits, '_' or '-') and stay unique.

Invariant: `call` never raises for a tool's failure; an unknown tool, a timeout, a broken session
or the tool's own error comes back as a `ToolOutcome` with `is_error` set, for the model to read.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any, TextIO

from protoserve.client.agent.mcp_results import DEFAULT_MAX_TOOL_OUTPUT_CHARS, field_of, result_text
from protoserve.client.agent.turns import ToolOutcome

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOL_LIST_PAGES = 100
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class McpConnectionError(Exception):
    """An MCP server could not be started, reached, initialised or listed; the message names it."""


@dataclass(frozen=True)
class McpServerSpec:
    """One MCP server: `stdio` with a command line, or `http` with a streamable-HTTP endpoint URL."""

    transport: str
    target: str

    @staticmethod
    def stdio(command_line: str) -> McpServerSpec:
        try:
            words = shlex.split(command_line)
        except ValueError as error:
            raise McpConnectionError(f"--mcp-stdio {command_line!r} is not a valid command line: {error}") from None
        if not words:
            raise McpConnectionError("--mcp-stdio needs a command, e.g. --mcp-stdio 'python my_server.py'")
        return McpServerSpec("stdio", command_line)

    @staticmethod
    def http(url: str) -> McpServerSpec:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise McpConnectionError(f"--mcp-http needs an http(s) URL such as http://127.0.0.1:8001/mcp, got {url!r}")
        return McpServerSpec("http", url)

    def describe(self) -> str:
        return f"`{self.target}` (stdio)" if self.transport == "stdio" else f"{self.target} (streamable HTTP)"


@dataclass(frozen=True)
class McpTool:
    """A tool of one server, and the name the model calls it by."""

    exposed_name: str
    original_name: str
    server_label: str
    description: str
    parameters: dict[str, Any]
    session: Any

    def as_openai_tool(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.exposed_name, "description": self.description, "parameters": self.parameters},
        }


def _describe_error(error: BaseException) -> str:
    """A one-line description; exception groups (from the transports' task groups) are unwrapped."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe_error(inner) for inner in error.exceptions)
    if isinstance(error, TimeoutError):
        return "no answer in time"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _sanitize(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "tool"
    return cleaned[:64]


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        suffix = f"_{number}"
        candidate = f"{name[: 64 - len(suffix)]}{suffix}"
        number += 1
    taken.add(candidate)
    return candidate


def assign_tool_names(listed: Sequence[tuple[str, str]]) -> list[str]:
    """Exposed names for (server label, tool name) pairs, in order; see the module docstring."""
    counts = Counter(tool_name for _, tool_name in listed)
    taken: set[str] = set()
    names = []
    for label, tool_name in listed:
        wanted = f"{label}_{tool_name}" if counts[tool_name] > 1 else tool_name
        names.append(_unique(_sanitize(wanted), taken))
    return names


def _http_transport(url: str) -> AbstractAsyncContextManager[Any]:
    try:
        from mcp.client.streamable_http import streamable_http_client
    except ImportError:  # mcp 1.x before the rename
        from mcp.client.streamable_http import (  # type: ignore[attr-defined, no-redef]
            streamablehttp_client as streamable_http_client,
        )
    return streamable_http_client(url)


def _stdio_transport(command_line: str, errlog: TextIO) -> AbstractAsyncContextManager[Any]:
    from mcp.client.stdio import StdioServerParameters, stdio_client

    command, *arguments = shlex.split(command_line)
    return stdio_client(StdioServerParameters(command=command, args=arguments), errlog=errlog)


async def _list_tools(session: Any) -> list[Any]:
    from mcp import types

    tools: list[Any] = []
    cursor = None
    for _ in range(MAX_TOOL_LIST_PAGES):
        if cursor is None:
            result = await session.list_tools()
        else:
            result = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
        tools.extend(result.tools)
        cursor = field_of(result, "next_cursor", "nextCursor")
        if not cursor:
            return tools
    raise McpConnectionError(f"the server listed more than {MAX_TOOL_LIST_PAGES} pages of tools")


@dataclass(frozen=True)
class _OpenServer:
    label: str
    session: Any
    tools: list[Any]


async def _open_server(
    spec: McpServerSpec, index: int, timeout: float, errlog: TextIO
) -> tuple[AsyncExitStack, _OpenServer]:
    """Start and initialise one server on a stack of its own; McpConnectionError when it fails."""
    from mcp import ClientSession

    server_stack = AsyncExitStack()
    try:
        transport = _stdio_transport(spec.target, errlog) if spec.transport == "stdio" else _http_transport(spec.target)
        streams = await server_stack.enter_async_context(transport)
        session = await server_stack.enter_async_context(ClientSession(streams[0], streams[1]))
        async with asyncio.timeout(timeout):
            initialized = await session.initialize()
            tools = await _list_tools(session)
    except (Exception, asyncio.CancelledError) as error:
        # Closing the server's stack stops its transport, which reports the real cause: a refused
        # connection first reaches this task as a cancellation from the transport's task group.
        try:
            await server_stack.aclose()
        except Exception as cleanup_error:
            raise McpConnectionError(
                f"cannot use MCP server {spec.describe()}: {_describe_error(cleanup_error)}"
            ) from cleanup_error
        if isinstance(error, asyncio.CancelledError):
            raise  # the caller cancelled us
        raise McpConnectionError(f"cannot use MCP server {spec.describe()}: {_describe_error(error)}") from error
    server_info = field_of(initialized, "server_info", "serverInfo")
    reported_name = getattr(server_info, "name", "") or ""
    label = _sanitize(reported_name) if reported_name else f"mcp{index}"
    return server_stack, _OpenServer(label, session, tools)


class McpToolbox:
    """The tools of every connected MCP server; see the module docstring for names and errors."""

    def __init__(
        self,
        tools: Sequence[McpTool],
        *,
        call_timeout: float = 120.0,
        max_output_chars: int = DEFAULT_MAX_TOOL_OUTPUT_CHARS,
    ) -> None:
        self._tools = {tool.exposed_name: tool for tool in tools}
        self._call_timeout = call_timeout
        self._max_output_chars = max_output_chars

    @classmethod
    async def connect(
        cls,
        specs: Sequence[McpServerSpec],
        stack: AsyncExitStack,
        *,
        connect_timeout: float = 30.0,
        call_timeout: float = 120.0,
        max_output_chars: int = DEFAULT_MAX_TOOL_OUTPUT_CHARS,
        errlog: TextIO | None = None,
    ) -> McpToolbox:
        """Connect to every server in order; the sessions close when `stack` closes."""
        servers: list[_OpenServer] = []
        for index, spec in enumerate(specs):
            server_stack, server = await _open_server(spec, index, connect_timeout, errlog or sys.stderr)
            stack.push_async_exit(server_stack)
            servers.append(server)
        listed = [(server, tool) for server in servers for tool in server.tools]
        names = assign_tool_names([(server.label, tool.name) for server, tool in listed])
        tools = [
            McpTool(
                exposed_name=name,
                original_name=tool.name,
                server_label=server.label,
                description=tool.description or "",
                parameters=dict(field_of(tool, "input_schema", "inputSchema") or EMPTY_PARAMETERS),
                session=server.session,
            )
            for name, (server, tool) in zip(names, listed, strict=True)
        ]
        return cls(tools, call_timeout=call_timeout, max_output_chars=max_output_chars)

    @property
    def tools(self) -> list[McpTool]:
        return list(self._tools.values())

    def openai_tools(self) -> list[dict[str, Any]]:
        return [tool.as_openai_tool() for tool in self._tools.values()]

    def names(self) -> list[str]:
        return list(self._tools)

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        tool = self._tools.get(name)
        if tool is None:
            offered = ", ".join(self._tools) or "none"
            return ToolOutcome(f"there is no tool named {name!r}; the tools are: {offered}", is_error=True)
        try:
            async with asyncio.timeout(self._call_timeout):
                result = await tool.session.call_tool(tool.original_name, arguments)
        except TimeoutError:
            return ToolOutcome(f"tool {name!r} did not finish within {self._call_timeout:g} s", is_error=True)
        except Exception as error:
            return ToolOutcome(f"tool {name!r} failed: {_describe_error(error)}", is_error=True)
        text, is_error = result_text(result, self._max_output_chars)
        return ToolOutcome(text, is_error)
