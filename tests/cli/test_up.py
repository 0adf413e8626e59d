"""`protoserve up`: argument handling, and child supervision with fake child commands."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from protoserve.client.api_keys import api_keys_in
from protoserve.client.cli import models as models_cli
from protoserve.client.cli import up

FAKE_CHILD = """
import argparse, signal, socket, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--marker", required=True)
parser.add_argument("--grpc", type=int)
parser.add_argument("--http", type=int)
parser.add_argument("--die-after", type=float)
parser.add_argument("--exit-code", type=int, default=0)
parser.add_argument("--ignore-term", action="store_true")
args = parser.parse_args()

def note(text):
    with open(args.marker, "a") as marker:
        marker.write(text + "\\n")

def on_signal(signum, frame):
    note(signal.Signals(signum).name)
    if not args.ignore_term:
        sys.exit(0)

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
note("started")
if args.grpc:
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.grpc}")
    server.start()
if args.http:
    listener = socket.create_server(("127.0.0.1", args.http))
started = time.monotonic()
while args.die_after is None or time.monotonic() - started < args.die_after:
    time.sleep(0.05)
sys.exit(args.exit_code)
"""

DRIVER = """
import json, sys
from protoserve.client.cli.up import UpPlan, run_plan
fields = json.loads(sys.argv[1])
fields["server_command"] = tuple(fields["server_command"])
fields["translator_command"] = tuple(fields["translator_command"])
sys.exit(run_plan(UpPlan(**fields)))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parse(*arguments: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(arguments)


# --- arguments ------------------------------------------------------------------------------------


def test_plan_passes_models_and_flags_through() -> None:
    args = parse("--model", "chat=/m/a", "--model", "/m/b", "--dtype", "float32", "--device", "cpu",
                 "--tool-parser", "hermes", "--api-key", "k", "--grpc-port", "6000", "--http-port", "6001",
                 "--host", "0.0.0.0", "--no-packed-weights", "--no-cpu-kernels")  # fmt: skip
    plan = up.plan_children(args, protoserve_command=("protoserve",), api_key_file=Path("/run/key"))
    assert plan.server_command == (
        "protoserve", "serve", "--host", "0.0.0.0", "--port", "6000", "--model", "chat=/m/a", "--model", "/m/b",
        "--dtype", "float32", "--device", "cpu", "--tool-parser", "hermes", "--no-packed-weights", "--no-cpu-kernels",
        "--api-key-file", "/run/key",
    )  # fmt: skip
    assert plan.translator_command == (
        "protoserve", "translate", "--host", "0.0.0.0", "--port", "6001", "--upstream", "127.0.0.1:6000",
        "--api-key-file", "/run/key", "--upstream-api-key-file", "/run/key",
    )  # fmt: skip
    assert "k" not in plan.server_command + plan.translator_command, "the key must stay off command lines"
    assert plan.grpc_target == "127.0.0.1:6000" and plan.http_url == "http://127.0.0.1:6001"


def test_tool_parser_choices_match_the_server() -> None:
    pytest.importorskip("torch")
    from protoserve.server.cli import add_serve_arguments

    server_parser = argparse.ArgumentParser()
    add_serve_arguments(server_parser)
    choices = next(action.choices for action in server_parser._actions if "--tool-parser" in action.option_strings)
    assert tuple(choices) == up.TOOL_PARSERS
    assert up.plan_children(parse("--tool-parser", "none", "--model", "/m")).server_command[-2:] == (
        "--tool-parser",
        "none",
    )


def test_api_key_file_is_private_and_removed() -> None:
    with up.private_key_file("s3cret") as path:
        assert path is not None
        assert path.read_text() == "s3cret\n"
        assert path.stat().st_mode & 0o077 == 0
    assert not path.exists()
    with up.private_key_file(None) as nothing:
        assert nothing is None


def test_plan_defaults_to_the_three_demo_models() -> None:
    folders = {"chat": Path("/c/chat"), "speech": Path("/c/speech"), "vision": Path("/c/vision")}
    plan = up.plan_children(parse(), demo_model_folders=lambda: folders)
    assert plan.server_command[1:3] == ("-m", "protoserve.client.cli")
    models = [plan.server_command[i + 1] for i, part in enumerate(plan.server_command) if part == "--model"]
    assert models == ["/c/chat", "/c/speech", "/c/vision"]
    assert "--dtype" not in plan.server_command and "--api-key" not in plan.translator_command
    assert "--tool-parser" not in plan.server_command  # the server's own default (auto) applies
    assert plan.grpc_target == "127.0.0.1:50051" and plan.http_port == 8000


@pytest.mark.parametrize(
    "arguments",
    [["--grpc-port", "0"], ["--http-port", "70000"], ["--grpc-port", "web"], ["--startup-timeout", "0"],
     ["--dtype", "float8"], ["--stop-timeout", "soon"], ["--tool-parser", "xml"], ["--drain-grace", "-1"],
     ["--drain-grace", "later"]],
)  # fmt: skip
def test_bad_arguments_are_usage_errors(arguments: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(*arguments)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


KEY_FILE_TEXT = "  sk-file-key \t\n\n# an old key, commented out\nsk-second-key\n"


def test_api_key_file_reaches_both_children_and_no_command_line(tmp_path: Path) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(KEY_FILE_TEXT)
    args = parse("--model", "/m/a", "--grpc-port", "6000", "--http-port", "6001", "--api-key-file", str(key_file))
    plan = up.plan_children(args, protoserve_command=("protoserve",))
    assert plan.server_command[-2:] == ("--api-key-file", str(key_file))
    assert plan.translator_command[-4:] == (
        "--api-key-file", str(key_file), "--upstream-api-key-file", str(key_file),
    )  # fmt: skip
    assert plan.api_key == "sk-file-key", "up's own health check sends the first key, stripped"
    for word in (*plan.server_command, *plan.translator_command):
        assert "sk-file-key" not in word and "sk-second-key" not in word, word
    assert "sk-file-key" not in repr(args)


def test_run_hands_the_given_key_file_to_the_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(KEY_FILE_TEXT)
    plans: list[up.UpPlan] = []
    monkeypatch.setattr(up, "run_plan", lambda plan: plans.append(plan) or 0)
    assert up.run(parse("--model", "/m/a", "--api-key-file", str(key_file))) == 0
    (plan,) = plans
    assert plan.server_command[-2:] == ("--api-key-file", str(key_file)) and plan.api_key == "sk-file-key"


def test_api_key_file_text_gives_its_keys() -> None:
    assert api_keys_in(KEY_FILE_TEXT) == ["sk-file-key", "sk-second-key"]  # what serve, translate and up read


@pytest.mark.parametrize(
    "content, message",
    [(None, "cannot read"), ("", "holds no API key"), (" \n\t\n", "holds no API key"),
     ("# only a comment\n", "holds no API key"), (b"\xff\xfe", "is not UTF-8 text")],
)  # fmt: skip
def test_an_unusable_api_key_file_is_a_usage_error(
    content: str | bytes | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    key_file = tmp_path / "api-keys"
    if isinstance(content, bytes):
        key_file.write_bytes(content)
    elif content is not None:
        key_file.write_text(content)
    with pytest.raises(SystemExit) as exited:
        parse("--api-key-file", str(key_file))
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument --api-key-file" in error and message in error and str(key_file) in error


def test_a_folder_is_not_an_api_key_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--api-key-file", str(tmp_path))
    assert exited.value.code == 2 and "cannot read" in capsys.readouterr().err


def test_api_key_and_api_key_file_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text("sk-file-key\n")
    with pytest.raises(SystemExit) as exited:
        parse("--api-key", "k", "--api-key-file", str(key_file))
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_drain_grace_goes_to_serve_and_sets_the_default_stop_timeout() -> None:
    plan = up.plan_children(parse("--model", "/m", "--drain-grace", "45"), protoserve_command=("protoserve",))
    assert plan.server_command[-2:] == ("--drain-grace", "45.0")
    assert "--drain-grace" not in plan.translator_command
    assert plan.stop_timeout == 75.0, "children get the drain grace and 30 s more before they are killed"
    default = up.plan_children(parse("--model", "/m"), protoserve_command=("protoserve",))
    assert "--drain-grace" not in default.server_command and default.stop_timeout == 60.0
    explicit = up.plan_children(parse("--model", "/m", "--drain-grace", "45", "--stop-timeout", "50"))
    assert explicit.stop_timeout == 50.0


def test_no_demo_models_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def unavailable(cache_dir: Path | None = None) -> dict[str, Path]:
        raise models_cli.DemoModelsUnavailable("fetching the demo models needs the server extra")

    monkeypatch.setattr(models_cli, "fetch_demo_model_folders", unavailable)
    assert up.run(parse()) == 1
    assert "needs the server extra; or name models with --model PATH" in capsys.readouterr().err


# --- supervision ---------------------------------------------------------------------------------


class Children:
    """Fake server and translator command lines, with marker files that record what each child saw."""

    def __init__(self, folder: Path) -> None:
        self.script = folder / "fake_child.py"
        self.script.write_text(FAKE_CHILD)
        self.server_marker = folder / "server.log"
        self.translator_marker = folder / "translator.log"
        self.grpc_port = free_port()
        self.http_port = free_port()

    def server(self, *extra: str) -> list[str]:
        return [sys.executable, str(self.script), "--marker", str(self.server_marker), "--grpc", str(self.grpc_port),
                *extra]  # fmt: skip

    def translator(self, *extra: str) -> list[str]:
        return [sys.executable, str(self.script), "--marker", str(self.translator_marker), "--http",
                str(self.http_port), *extra]  # fmt: skip

    def start_up(self, server: list[str], translator: list[str], stop_timeout: float = 10) -> subprocess.Popen[str]:
        plan = up.UpPlan(
            server_command=tuple(server),
            translator_command=tuple(translator),
            grpc_target=f"127.0.0.1:{self.grpc_port}",
            http_host="127.0.0.1",
            http_port=self.http_port,
            startup_timeout=20,
            stop_timeout=stop_timeout,
        )
        command = [sys.executable, "-c", DRIVER, json.dumps(asdict(plan))]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def notes(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def wait_for_line(process: subprocess.Popen[str], text: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert text in line, (line, process.stderr.read() if process.stderr else "")
    return line


def test_up_waits_for_health_then_forwards_the_signal_to_both(tmp_path: Path) -> None:
    children = Children(tmp_path)
    process = children.start_up(children.server(), children.translator())
    line = wait_for_line(process, "protoserve is up")
    assert f"gRPC at 127.0.0.1:{children.grpc_port}" in line and f"http://127.0.0.1:{children.http_port}/v1" in line
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert notes(children.server_marker) == ["started", "SIGTERM"]
    assert notes(children.translator_marker) == ["started", "SIGTERM"]


def test_sigint_is_forwarded_once(tmp_path: Path) -> None:
    children = Children(tmp_path)
    process = children.start_up(children.server(), children.translator())
    wait_for_line(process, "protoserve is up")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 0
    assert notes(children.server_marker) == ["started", "SIGINT"]


def test_sighup_stops_both_children_as_sigterm_does(tmp_path: Path) -> None:
    """The children run in process groups of their own, so a closed terminal's hangup reaches `up` only."""
    children = Children(tmp_path)
    process = children.start_up(children.server(), children.translator())
    wait_for_line(process, "protoserve is up")
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=20) == 0
    assert notes(children.server_marker) == ["started", "SIGTERM"]
    assert notes(children.translator_marker) == ["started", "SIGTERM"]


@pytest.mark.parametrize(
    "host, reachable",
    [("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "::1"), ("[::]", "::1"), ("10.1.2.3", "10.1.2.3")],
)
def test_up_reaches_an_any_address_through_the_loopback_of_its_family(host: str, reachable: str) -> None:
    assert up.connect_host(host) == reachable


def test_plan_for_the_ipv6_any_address() -> None:
    args = parse("--model", "/m/a", "--host", "::", "--grpc-port", "6000", "--http-port", "6001")
    plan = up.plan_children(args, protoserve_command=("protoserve",))
    assert plan.grpc_target == "[::1]:6000" and plan.http_url == "http://[::1]:6001"
    assert plan.translator_command[-2:] == ("--upstream", "[::1]:6000")


def test_a_dying_child_stops_the_other_and_fails(tmp_path: Path) -> None:
    children = Children(tmp_path)
    process = children.start_up(children.server(), children.translator("--die-after", "0.5", "--exit-code", "3"))
    wait_for_line(process, "protoserve is up")
    assert process.wait(timeout=20) == 1
    assert process.stderr is not None
    assert "the translator exited with status 3; stopping" in process.stderr.read()
    assert notes(children.server_marker) == ["started", "SIGTERM"]


def test_server_failing_at_startup_never_starts_the_translator(tmp_path: Path) -> None:
    children = Children(tmp_path)
    server = [sys.executable, str(children.script), "--marker", str(children.server_marker), "--die-after", "0",
              "--exit-code", "1"]  # fmt: skip
    process = children.start_up(server, children.translator())
    assert process.wait(timeout=20) == 1
    assert process.stderr is not None
    assert "the server exited with status 1 before the gRPC server" in process.stderr.read()
    assert not children.translator_marker.exists()


def test_children_that_ignore_the_signal_are_killed_after_the_stop_timeout(tmp_path: Path) -> None:
    children = Children(tmp_path)
    process = children.start_up(children.server("--ignore-term"), children.translator(), stop_timeout=0.5)
    wait_for_line(process, "protoserve is up")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 1
    assert time.monotonic() - started < 10
    assert process.stderr is not None
    errors = process.stderr.read()
    assert "the server did not stop in 0.5 s; killing it" in errors
    assert "the server exited with signal SIGKILL" in errors


def test_a_command_that_cannot_start(tmp_path: Path) -> None:
    children = Children(tmp_path)
    process = children.start_up([str(tmp_path / "no-such-program")], children.translator())
    assert process.wait(timeout=20) == 1
    assert process.stderr is not None and "cannot start the server" in process.stderr.read()
