"""Real `protoserve serve` and `protoserve translate` processes for tests, on loopback only.

`start_server_process` runs the server on a unix socket (no port race) and waits for its
"serving on" line; `start_translator_process` runs the translator on a free TCP port and waits for
its "listening on" line. Both write stdout and stderr to a log file that tests may read (to check,
for example, that an API key never appears in it). `stop_process` sends SIGTERM and waits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SERVING_LINE = "protoserve serving on "
LISTENING_LINE = "protoserve translator listening on "


class StackStartError(RuntimeError):
    """A process of the stack exited or stayed silent before it was ready; the message holds its log."""


@dataclass
class StackProcess:
    """A started process, the log it writes, and the address it announced."""

    process: subprocess.Popen[bytes]
    log_path: Path
    address: str  # "unix:/path" for a server, "http://127.0.0.1:PORT" for a translator

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for listeners that cannot pick their own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def subprocess_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return environment


def _launch(arguments: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "protoserve.client.cli", *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=subprocess_environment(),
        )


def _wait_for_line(process: subprocess.Popen[bytes], log_path: Path, marker: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            if line.startswith(marker):
                return line[len(marker) :].strip()
        if process.poll() is not None:
            raise StackStartError(f"exited with {process.returncode} before it was ready:\n{text[-4000:]}")
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise StackStartError(f"not ready within {timeout_s} s:\n{log_path.read_text(errors='replace')[-4000:]}")


def start_server_process(
    models: Sequence[str], socket_path: Path, log_path: Path, extra: Sequence[str] = (), timeout_s: float = 240.0
) -> StackProcess:
    """`protoserve serve` on the unix socket `socket_path` (no TCP listener); `models` are `--model` values."""
    arguments = ["serve", "--port", "0", "--unix-socket", str(socket_path), "--device", "cpu", *extra]
    for model in models:
        arguments += ["--model", model]
    process = _launch(arguments, log_path)
    _wait_for_line(process, log_path, SERVING_LINE, timeout_s)
    return StackProcess(process, log_path, f"unix:{socket_path}")


def restart_server_process(previous: StackProcess, models: Sequence[str], extra: Sequence[str] = ()) -> StackProcess:
    """Start a server again on the same socket as `previous` (which must have exited)."""
    socket_path = Path(previous.address.removeprefix("unix:"))
    socket_path.unlink(missing_ok=True)
    return start_server_process(models, socket_path, previous.log_path, extra)


def start_translator_process(
    upstream: str, log_path: Path, extra: Sequence[str] = (), timeout_s: float = 60.0
) -> StackProcess:
    """`protoserve translate` in front of `upstream` on a free port of 127.0.0.1."""
    process = _launch(["translate", "--upstream", upstream, "--host", "127.0.0.1", "--port", "0", *extra], log_path)
    url = _wait_for_line(process, log_path, LISTENING_LINE, timeout_s)
    return StackProcess(process, log_path, url)


def stop_process(started: StackProcess, timeout_s: float = 30.0) -> int:
    """SIGTERM, then wait up to `timeout_s` (SIGKILL after that); returns the exit code."""
    if started.process.poll() is None:
        started.process.send_signal(signal.SIGTERM)
        try:
            started.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            started.process.kill()
            started.process.wait()
    return int(started.process.returncode)


@dataclass(frozen=True)
class DemoStack:
    """URLs and model ids of the running stack."""

    server: StackProcess
    translator: StackProcess
    chat_model: str
    speech_model: str
    vision_model: str

    @property
    def base_url(self) -> str:
        """What the openai SDK takes as base_url."""
        return f"{self.translator.address}/v1"

    @property
    def grpc_target(self) -> str:
        return self.server.address
