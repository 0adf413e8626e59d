"""`protoserve agent`: run MCP tools with a protoserve model, one-shot or interactively.

    protoserve agent --mcp-stdio "python calculator.py" "What is 2 + 3?"
    echo "List the files in /tmp" | protoserve agent --mcp-http http://127.0.0.1:8001/mcp
    protoserve agent --openai-url http://127.0.0.1:8000/v1 --mcp-stdio "npx @modelcontextprotocol/server-everything"

The prompt is the argument, or else standard input read whole; when standard input is a terminal
and no prompt is given, each line typed is a prompt and the conversation is kept (`/clear`,
`/tools`, `/exit`). The answer streams to stdout; tool calls and their results are reported on
stderr. Exit status: 0 answered, 1 a server or the model failed, 2 bad usage, 3 `--max-turns` ran
out while the model was still calling tools.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import threading
from contextlib import AsyncExitStack
from typing import TextIO

from protoserve.client.agent.loop import TOOL_CHOICES, AgentLoop, AgentReporter
from protoserve.client.agent.mcp_toolbox import McpConnectionError, McpServerSpec, McpToolbox
from protoserve.client.agent.model_backends import GrpcModelBackend, ModelBackend, ModelCallFailed
from protoserve.client.agent.turns import AssistantTurn, ToolCallRequest, ToolOutcome

if importlib.util.find_spec("mcp") is None:  # checked cheaply here, imported when servers connect
    raise ImportError("No module named 'mcp'", name="mcp")

COMMANDS_HELP = "/tools lists the tools, /clear forgets the conversation, /exit (or end of input) leaves"
SHOWN_RESULT_CHARS = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prompt", nargs="?", help="the prompt; default: read standard input (interactive on a terminal)"
    )
    parser.add_argument(
        "--mcp-stdio", action="append", default=[], metavar="COMMAND", help="an MCP server to start (repeatable)"
    )
    parser.add_argument(
        "--mcp-http", action="append", default=[], metavar="URL", help="a streamable-HTTP MCP server (repeatable)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--grpc", metavar="HOST:PORT", default="127.0.0.1:50051", help="protoserve's gRPC address")
    where.add_argument(
        "--openai-url", metavar="URL", help="use an OpenAI-compatible API instead (the translator's /v1)"
    )
    parser.add_argument("--model", default="", help="model id (default: the server's default model)")
    parser.add_argument("--api-key", metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    parser.add_argument("--system", default="", metavar="TEXT", help="a system message that starts the conversation")
    parser.add_argument("--max-turns", type=int, default=10, metavar="N", help="model requests per prompt (default 10)")
    parser.add_argument(
        "--tool-choice",
        choices=TOOL_CHOICES,
        default="auto",
        help="auto (default); required: the first reply to each prompt must call a tool; none: no tool calls",
    )
    parser.add_argument("--temperature", type=float, help="0 is greedy; the server's default otherwise")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="most tokens of one reply")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="give up on a reply after this")
    parser.add_argument(
        "--tool-timeout", type=float, default=120.0, metavar="SECONDS", help="give up on a tool call after this"
    )


class TerminalReporter(AgentReporter):
    """The answer to `out` as it streams; tool calls and results, one line each, to `notices`."""

    def __init__(self, out: TextIO, notices: TextIO) -> None:
        self._out = out
        self._notices = notices
        self._open_line = False

    def text(self, piece: str) -> None:
        self._out.write(piece)
        self._out.flush()
        self._open_line = not piece.endswith("\n")

    def turn_finished(self, turn: AssistantTurn) -> None:
        if self._open_line:
            self._out.write("\n")
            self._out.flush()
            self._open_line = False

    def tool_started(self, call: ToolCallRequest) -> None:
        print(f"[tool] {call.name}({call.arguments})", file=self._notices, flush=True)

    def tool_finished(self, call: ToolCallRequest, outcome: ToolOutcome) -> None:
        text = " ".join(outcome.as_message_content().split())
        if len(text) > SHOWN_RESULT_CHARS:
            text = text[:SHOWN_RESULT_CHARS] + "..."
        print(f"[tool] {call.name} -> {text}", file=self._notices, flush=True)


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.max_turns < 1:
        return "--max-turns must be at least 1"
    if not args.timeout > 0 or not args.tool_timeout > 0:
        return "--timeout and --tool-timeout must be more than 0 seconds"
    if args.max_tokens is not None and args.max_tokens < 1:
        return "--max-tokens must be at least 1"
    if args.tool_choice == "required" and not (args.mcp_stdio or args.mcp_http):
        return "--tool-choice required needs tools: add --mcp-stdio or --mcp-http"
    return None


def _make_backend(args: argparse.Namespace) -> ModelBackend:
    sampling = {
        name: value
        for name, value in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
        if value is not None
    }
    if args.openai_url:
        from protoserve.client.agent.openai_backend import OpenAIModelBackend

        return OpenAIModelBackend(
            args.openai_url, model=args.model, api_key=args.api_key, timeout=args.timeout, sampling=sampling
        )
    return GrpcModelBackend(args.grpc, model=args.model, api_key=args.api_key, timeout=args.timeout, sampling=sampling)


async def _answer(agent: AgentLoop, prompt: str, notices: TextIO) -> int:
    try:
        answer = await agent.ask(prompt)
    except ModelCallFailed as error:
        print(f"protoserve agent: {error}", file=notices, flush=True)
        return 1
    if not answer.answered:
        print(
            f"protoserve agent: stopped after {answer.turns} turns while the model was still calling tools"
            " (raise --max-turns)",
            file=notices,
            flush=True,
        )
        return 3
    return 0


async def read_line(prompt: str) -> str:
    """`input(prompt)` without blocking the event loop. The reading thread is a daemon: Ctrl-C at the
    prompt cancels this coroutine and the program can exit while the thread still waits for a line."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def settle(value: str | None, error: BaseException | None) -> None:
        if line.done():
            return
        if error is not None:
            line.set_exception(error)
        else:
            line.set_result(value or "")

    def read() -> None:
        try:
            value = input(prompt)
        except BaseException as error:  # EOFError at end of input, KeyboardInterrupt
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=read, name="protoserve-agent-input", daemon=True).start()
    return await line


async def _interactive(agent: AgentLoop, tool_names: list[str], notices: TextIO) -> int:
    status = 0
    while True:
        try:
            line = await read_line("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=notices)
            return status
        text = line.strip()
        if text in ("/exit", "/quit"):
            return status
        if text == "/clear":
            agent.clear()
            print("(conversation cleared)", file=notices)
        elif text == "/tools":
            print(", ".join(tool_names) or "no tools", file=notices)
        elif text == "/help" or (text.startswith("/") and " " not in text):
            print(COMMANDS_HELP, file=notices)
        elif text:
            status = max(status, await _answer(agent, text, notices))


async def run_agent(
    args: argparse.Namespace, specs: list[McpServerSpec], prompt: str | None, out: TextIO, notices: TextIO
) -> int:
    """Connect the MCP servers and the model, then answer `prompt` (or run interactively when None)."""
    async with AsyncExitStack() as stack:
        try:
            toolbox = await McpToolbox.connect(specs, stack, call_timeout=args.tool_timeout, errlog=notices)
        except McpConnectionError as error:
            print(f"protoserve agent: {error}", file=notices, flush=True)
            return 1
        try:
            backend = _make_backend(args)
        except ModelCallFailed as error:
            print(f"protoserve agent: {error}", file=notices, flush=True)
            return 2
        stack.push_async_callback(backend.close)
        try:
            agent = AgentLoop(
                backend,
                toolbox,
                system=args.system,
                max_turns=args.max_turns,
                tool_choice=args.tool_choice,
                reporter=TerminalReporter(out, notices),
            )
        except ValueError as error:
            print(f"protoserve agent: {error}", file=notices, flush=True)
            return 2
        if prompt is not None:
            return await _answer(agent, prompt, notices)
        print(
            f"protoserve agent with {backend.where}; tools: {', '.join(toolbox.names()) or 'none'}; {COMMANDS_HELP}",
            file=notices,
        )
        return await _interactive(agent, toolbox.names(), notices)


def run(args: argparse.Namespace) -> int:
    problem = _usage_error(args)
    if problem is not None:
        print(f"protoserve agent: {problem}", file=sys.stderr)
        return 2
    try:
        specs = [McpServerSpec.stdio(command) for command in args.mcp_stdio]
        specs += [McpServerSpec.http(url) for url in args.mcp_http]
    except McpConnectionError as error:
        print(f"protoserve agent: {error}", file=sys.stderr)
        return 2
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            print("protoserve agent: no prompt: pass one as an argument or on standard input", file=sys.stderr)
            return 2
    return asyncio.run(run_agent(args, specs, prompt, sys.stdout, sys.stderr))
