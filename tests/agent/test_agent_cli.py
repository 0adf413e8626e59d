"""`protoserve agent` end to end: gRPC and the translator's REST API, stdio and HTTP MCP servers,
prompts from the argument and from stdin, exit statuses and usage errors.

The command runs in a worker thread (its own event loop) while the fake servers run in the test's."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from protoserve.client.cli import main as cli_main

from .conftest import read_call_log
from .fake_protoserve import start_fake_protoserve, text_reply, tool_call_reply


async def protoserve_agent(*arguments: str) -> int:
    return await asyncio.to_thread(cli_main.main, ["agent", *arguments])


async def test_one_shot_over_grpc_with_a_stdio_server(
    stdio_command: Callable[..., str], call_log: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fake = await start_fake_protoserve(
        [tool_call_reply([("c1", "add", '{"a": 2, "b": 3}')], text="Adding."), text_reply("The sum is ", "5.")]
    )
    try:
        status = await protoserve_agent(
            "--grpc", fake.address, "--mcp-stdio", stdio_command(), "--temperature", "0", "What is 2 + 3?"
        )
    finally:
        await fake.stop()
    captured = capfd.readouterr()
    assert status == 0, captured.err
    assert captured.out == "Adding.\nThe sum is 5.\n"
    assert '[tool] add({"a": 2, "b": 3})\n[tool] add -> 5\n' in captured.err
    assert [entry["tool"] for entry in read_call_log(call_log) if "tool" in entry] == ["add"]
    assert fake.requests[0].sampling.temperature == 0.0
    assert fake.requests[0].messages[0].content[0].text == "What is 2 + 3?"


async def test_prompt_from_stdin_through_the_translator_with_an_http_server(
    http_mcp_url: str, call_log: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    translator_server = pytest.importorskip("protoserve.translator.server")
    from protoserve.translator.config import TranslatorConfig

    fake = await start_fake_protoserve(
        [
            tool_call_reply([("c1", "list_files", '{"directory": "."}'), ("c2", "multiply", '{"a": 6, "b": 7}')]),
            text_reply("Three entries; 6 * 7 = 42."),
        ]
    )
    translator = await translator_server.start_translator(TranslatorConfig(upstream=fake.address), port=0)
    monkeypatch.setattr("sys.stdin", io.StringIO("List the files, and what is 6 * 7?\n"))
    try:
        status = await protoserve_agent(
            "--openai-url", f"{translator.url}/v1", "--model", "fake-model", "--mcp-http", http_mcp_url
        )
    finally:
        await translator.stop()
        await fake.stop()
    captured = capfd.readouterr()
    assert status == 0, captured.err
    assert captured.out == "Three entries; 6 * 7 = 42.\n"
    assert sorted(entry["tool"] for entry in read_call_log(call_log)) == ["list_files", "multiply"]
    second = fake.requests[1]
    tool_results = [(m.tool_call_id, m.content[0].text) for m in second.messages if m.role == "tool"]
    assert tool_results == [("c1", "alpha.txt\nbeta.txt\nnotes"), ("c2", "42")]
    assert json.loads(second.messages[1].tool_calls[1].function.arguments) == {"a": 6, "b": 7}


async def test_max_turns_and_failures_give_their_exit_statuses(
    http_mcp_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    looping = [tool_call_reply([(f"c{n}", "add", '{"a": 1, "b": 1}')]) for n in range(2)]
    fake = await start_fake_protoserve(looping)
    try:
        status = await protoserve_agent("--grpc", fake.address, "--mcp-http", http_mcp_url, "--max-turns", "2", "go")
    finally:
        await fake.stop()
    assert status == 3
    assert "stopped after 2 turns while the model was still calling tools" in capfd.readouterr().err

    status = await protoserve_agent("--grpc", "127.0.0.1:9", "--timeout", "5", "hello")
    assert status == 1
    assert "protoserve agent: 127.0.0.1:9: UNAVAILABLE" in capfd.readouterr().err

    status = await protoserve_agent("--mcp-stdio", "/nonexistent/mcp-server", "hello")
    assert status == 1
    assert "cannot use MCP server `/nonexistent/mcp-server` (stdio)" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--max-turns", "0", "hi"], "--max-turns must be at least 1"),
        (["--timeout", "0", "hi"], "must be more than 0 seconds"),
        (["--max-tokens", "0", "hi"], "--max-tokens must be at least 1"),
        (["--tool-choice", "required", "hi"], "--tool-choice required needs tools"),
        (["--openai-url", "ftp://x", "hi"], "--openai-url must be http(s)"),
        (["--mcp-http", "localhost:8001", "hi"], "--mcp-http needs an http(s) URL"),
    ],
)
def test_usage_errors(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main.main(["agent", *arguments])
    assert status == 2
    assert message in capsys.readouterr().err


def test_an_empty_stdin_prompt_is_refused(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert cli_main.main(["agent"]) == 2
    assert "no prompt" in capsys.readouterr().err


def test_grpc_and_openai_url_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["agent", "--grpc", "127.0.0.1:1", "--openai-url", "http://127.0.0.1:2", "hi"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_without_mcp_the_command_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "class HideMcp:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mcp' or name.startswith('mcp.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, HideMcp())\n"
        "from protoserve.client.cli.main import main\n"
        "sys.exit(main(['agent', 'hello']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "protoserve agent needs the agent extra: pip install 'protoserve[agent]'" in result.stderr


async def test_interactive_session_commands_and_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    from protoserve.client.agent import cli as agent_cli
    from protoserve.client.agent.loop import AgentLoop
    from protoserve.client.agent.model_backends import ModelCallFailed

    from .test_agent_loop import RendezvousToolbox, ScriptedBackend, answer, calls_turn

    lines = iter(["/tools", "", "What is 1 + 2?", "/clear", "/help", "/bogus", "fail please", "/exit", "never read"])

    async def scripted_line(prompt: str) -> str:
        return next(lines)

    monkeypatch.setattr(agent_cli, "read_line", scripted_line)
    backend = ScriptedBackend(
        [calls_turn(("c1", "add", '{"a": 1, "b": 2}')), answer("It is 3."), ModelCallFailed("model went away")]
    )
    out, notices = io.StringIO(), io.StringIO()
    agent = AgentLoop(backend, RendezvousToolbox(), reporter=agent_cli.TerminalReporter(out, notices))
    status = await agent_cli._interactive(agent, ["add", "multiply"], notices)
    assert status == 1  # one prompt failed
    assert out.getvalue() == "It is 3.\n"
    assert notices.getvalue().splitlines() == [
        "add, multiply",
        '[tool] add({"a": 1, "b": 2})',
        "[tool] add -> 3",
        "(conversation cleared)",
        agent_cli.COMMANDS_HELP,
        agent_cli.COMMANDS_HELP,
        "protoserve agent: model went away",
    ]
    assert agent.messages == []  # cleared, and the failed prompt left nothing
    assert next(lines) == "never read"


async def test_read_line_reads_in_a_thread_and_passes_end_of_input(monkeypatch: pytest.MonkeyPatch) -> None:
    from protoserve.client.agent import cli as agent_cli

    answers: list[str | BaseException] = ["typed text", EOFError()]

    def fake_input(prompt: str) -> str:
        value = answers.pop(0)
        if isinstance(value, BaseException):
            raise value
        return value

    monkeypatch.setattr("builtins.input", fake_input)
    assert await agent_cli.read_line("> ") == "typed text"
    with pytest.raises(EOFError):
        await agent_cli.read_line("> ")
