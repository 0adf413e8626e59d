"""Supervising child processes for `protoserve up`: start, wait until ready, forward signals, stop together.

Invariant: when `handling_signals()` exits, no child started through the supervisor is still running
(children that outlive a stop timeout are killed).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TextIO

# SIGHUP (the terminal closed, the ssh session dropped) reaches `up` alone, since the children run in
# process groups of their own: it stops them as SIGTERM does (the server drains).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SENT_FOR = {signal.SIGHUP: signal.SIGTERM}


@dataclass
class ChildProcess:
    """A named child command line and, once started, its process."""

    name: str
    command: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def wait_for_tcp_port(host: str, port: int, *, timeout: float) -> bool:
    """True when something accepts TCP connections on host:port within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Supervisor:
    """Starts children in process groups of their own and stops them together."""

    def __init__(self, *, stop_timeout: float, poll_interval: float = 0.1, log: TextIO | None = None) -> None:
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self.stop_requested = False
        self._children: list[ChildProcess] = []
        self._log = log or sys.stderr

    def _say(self, message: str) -> None:
        print(f"protoserve up: {message}", file=self._log, flush=True)

    # --- signals -------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        for child in self._children:
            if child.running and child.process is not None:
                child.process.send_signal(_SENT_FOR.get(signal.Signals(signum), signum))

    @contextmanager
    def handling_signals(self) -> Iterator[Supervisor]:
        """Forward SIGINT/SIGTERM (SIGHUP as SIGTERM) to the children while inside; stop any child left
        running on the way out."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED_SIGNALS}
        try:
            yield self
        finally:
            try:
                self._stop_all(signal.SIGTERM)
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    # --- children ------------------------------------------------------------------------------

    def start(self, child: ChildProcess) -> ChildProcess:
        """Start `child` in a process group of its own. Raises OSError when the command cannot run."""
        child.process = subprocess.Popen(child.command, process_group=0)
        self._children.append(child)
        if self.stop_requested:  # a signal arrived while it was starting: pass it on now
            child.process.send_signal(signal.SIGTERM)
        return child

    def wait_until(self, ready: Callable[[], bool], child: ChildProcess, timeout: float) -> bool:
        """Poll `ready` until it is True; False when `child` exits, a signal arrives or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stop_requested or not child.running:
                return False
            if ready():
                return True
            time.sleep(self.poll_interval)
        return False

    def watch(self) -> int:
        """Wait while every child runs. Returns 0 after a clean shutdown on a signal, non-zero otherwise."""
        while not self.stop_requested:
            for child in self._children:
                code = child.exit_code
                if code is not None:
                    return self.shut_down(reason=f"the {child.name} exited with {describe_exit(code)}")
            time.sleep(self.poll_interval)
        return self._finish_requested_stop()

    def not_ready_reason(self, child: ChildProcess, what: str, timeout: float) -> str:
        """Why `wait_until` gave up on `child`, in words."""
        code = child.exit_code
        if code is not None:
            return f"the {child.name} exited with {describe_exit(code)} before {what} was ready"
        return f"{what} was not ready after {timeout:g} s"

    def shut_down(self, *, reason: str) -> int:
        """Stop every child after a failure (`reason`), or finish a shutdown a signal asked for."""
        if self.stop_requested:
            return self._finish_requested_stop()
        self._say(f"{reason}; stopping")
        self._stop_all(signal.SIGTERM)
        return 1

    def _finish_requested_stop(self) -> int:
        """The children got the signal already; wait for them (killing them after `stop_timeout`)."""
        self._kill_after(self.stop_timeout)
        clean_codes = {0, -signal.SIGINT, -signal.SIGTERM}
        failed = [child for child in self._children if child.exit_code not in clean_codes]
        for child in failed:
            self._say(f"the {child.name} exited with {describe_exit(child.exit_code or 0)}")
        return 1 if failed else 0

    def _stop_all(self, first_signal: signal.Signals) -> None:
        """Send `first_signal` to running children, then wait for them (killing them after `stop_timeout`)."""
        for child in self._children:
            if child.running and child.process is not None:
                child.process.send_signal(first_signal)
        self._kill_after(self.stop_timeout)

    def _kill_after(self, timeout: float) -> None:
        """Wait up to `timeout` for every child to exit, then kill and reap those still running."""
        deadline = time.monotonic() + timeout
        while any(child.running for child in self._children) and time.monotonic() < deadline:
            time.sleep(self.poll_interval)
        for child in self._children:
            if child.running and child.process is not None:
                self._say(f"the {child.name} did not stop in {timeout:g} s; killing it")
                child.process.kill()
            if child.process is not None:
                child.process.wait()
