"""`protoserve up`: the gRPC server and the OpenAI translator as two child processes, for local use.

Order: start `protoserve serve`, wait until its health check says SERVING, start `protoserve
translate` against it, wait until its HTTP port accepts connections, print the addresses. SIGINT and
SIGTERM are forwarded to both children once each time they arrive (the server drains on the first
and aborts on a second). The children run in process groups of their own, so a Ctrl-C in the terminal
reaches them only through `up` and a draining server does not see it twice. When one child exits on
its own, the other is stopped and `up` exits non-zero. `up` waits for both children before exiting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protoserve.client.api_keys import api_keys_in
from protoserve.client.cli.supervisor import ChildProcess, Supervisor, wait_for_tcp_port

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8000
DEFAULT_DRAIN_GRACE = 30.0  # serve's --drain-grace default
STOP_TIMEOUT_OVER_DRAIN_GRACE = 30.0  # the default --stop-timeout is the drain grace plus this
# The server's --tool-parser choices (protoserve.server.cli); the client does not import the server.
TOOL_PARSERS = ("auto", "hermes", "llama3", "mistral", "mistral_v11", "none")
_ANY_IPV4_ADDRESS = {"0.0.0.0", ""}
# An IPv6 any-address: the translator (aiohttp) binds it for IPv6 only, so IPv4's loopback never answers.
_ANY_IPV6_ADDRESS = {"::", "[::]"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address both servers listen on (default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=_port, default=DEFAULT_GRPC_PORT, help="gRPC port (default 50051)")
    parser.add_argument("--http-port", type=_port, default=DEFAULT_HTTP_PORT, help="OpenAI API port (default 8000)")
    parser.add_argument(
        "--model",
        action="append",
        metavar="[ID=]PATH",
        help="a model folder to serve; repeatable. Default: the three demo models (chat, speech, vision)",
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), help="passed to serve")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="passed to serve")
    parser.add_argument(
        "--tool-parser",
        choices=TOOL_PARSERS,
        help="passed to serve: the tool-call format replies are parsed in (default auto: read from the chat "
        "template, else hermes; none: never parse)",
    )
    parser.add_argument(
        "--torch-threads",
        type=_positive_count,
        metavar="N",
        help="passed to serve: CPU threads for the model's math (default: torch's choice, one per core)",
    )
    parser.add_argument(
        "--no-packed-weights",
        action="store_true",
        help="passed to serve: CPU: dense weights only, no oneDNN-packed copies (half the weight memory)",
    )
    parser.add_argument(
        "--no-cpu-kernels",
        action="store_true",
        help="passed to serve: CPU: torch's ops only, no C++ kernels built on this machine",
    )
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        metavar="KEY",
        help="required by both servers; the translator sends it upstream (shows in `ps`: prefer --api-key-file)",
    )
    keys.add_argument(
        "--api-key-file",
        type=_api_key_file,
        metavar="PATH",
        help="a file of API keys, one a line, as serve reads it (blank lines and # comments skipped): both "
        "servers accept each, the translator sends the first upstream; no key shows on a command line",
    )
    parser.add_argument(
        "--startup-timeout",
        type=_positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="give up when a server is not ready after this long (default 600)",
    )
    parser.add_argument(
        "--drain-grace",
        type=_non_negative_seconds,
        metavar="SECONDS",
        help=f"passed to serve: on SIGTERM, how long in-flight requests may take to finish "
        f"(default {DEFAULT_DRAIN_GRACE:g})",
    )
    parser.add_argument(
        "--stop-timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="after a shutdown signal, kill children still running after this long "
        f"(default: the drain grace + {STOP_TIMEOUT_OVER_DRAIN_GRACE:g}, i.e. "
        f"{DEFAULT_DRAIN_GRACE + STOP_TIMEOUT_OVER_DRAIN_GRACE:g})",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 1..65535")
    return port


def _positive_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count} must be 1 or more")
    return count


def _positive_seconds(text: str) -> float:
    seconds = _seconds(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return seconds


def _non_negative_seconds(text: str) -> float:
    seconds = _seconds(text)
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 seconds or more")
    return seconds


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


@dataclass(frozen=True)
class ApiKeyFile:
    """A readable file holding at least one API key; `first_key` is the one `up` itself sends."""

    path: Path
    first_key: str = field(repr=False)


def _api_key_file(text: str) -> ApiKeyFile:
    """--api-key-file: read now, so an unreadable or keyless file is a usage error before anything starts."""
    path = Path(text)
    try:
        keys = api_keys_in(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not UTF-8 text") from None
    if not keys:
        raise argparse.ArgumentTypeError(f"{text!r} holds no API key (one a line; blank and # lines are skipped)")
    return ApiKeyFile(path, keys[0])


@dataclass(frozen=True)
class UpPlan:
    """The two child command lines and where to find them once they run."""

    server_command: tuple[str, ...]
    translator_command: tuple[str, ...]
    grpc_target: str  # where `up` checks the server's health
    http_host: str  # where `up` checks that the translator listens
    http_port: int
    api_key: str | None = None
    startup_timeout: float = 600.0
    stop_timeout: float = 60.0

    @property
    def http_url(self) -> str:
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        return f"http://{host}:{self.http_port}"


def connect_host(host: str) -> str:
    """Where a local client reaches a server listening on `host`: the loopback of the same family
    for an any-address."""
    if host in _ANY_IPV4_ADDRESS:
        return "127.0.0.1"
    if host in _ANY_IPV6_ADDRESS:
        return "::1"
    return host


def plan_children(
    args: argparse.Namespace,
    *,
    demo_model_folders: Callable[[], dict[str, Path]] | None = None,
    protoserve_command: Sequence[str] = (sys.executable, "-m", "protoserve.client.cli"),
    api_key_file: Path | None = None,
) -> UpPlan:
    """The children's command lines for `args`; `demo_model_folders` gives the default models.

    With `--api-key`, both children read the key from `api_key_file` (written by `run`, mode 0600);
    with `--api-key-file`, from that file. Either way no key appears on a command line that `ps` shows.
    """
    if args.api_key and api_key_file is None:
        raise ValueError("an API key needs api_key_file, the private file the children read it from")
    given_key_file: ApiKeyFile | None = args.api_key_file
    children_key_file = given_key_file.path if given_key_file else api_key_file if args.api_key else None
    drain_grace = DEFAULT_DRAIN_GRACE if args.drain_grace is None else args.drain_grace
    stop_timeout = drain_grace + STOP_TIMEOUT_OVER_DRAIN_GRACE if args.stop_timeout is None else args.stop_timeout
    models = list(args.model or ())
    if not models:
        if demo_model_folders is None:
            from protoserve.client.cli.models import fetch_demo_model_folders

            demo_model_folders = fetch_demo_model_folders
        models = [str(folder) for folder in demo_model_folders().values()]
    reachable = connect_host(args.host)
    grpc_host = f"[{reachable}]" if ":" in reachable else reachable
    server = [*protoserve_command, "serve", "--host", args.host, "--port", str(args.grpc_port)]
    for model in models:
        server += ["--model", model]
    for flag, value in (("--dtype", args.dtype), ("--device", args.device), ("--tool-parser", args.tool_parser)):
        if value:
            server += [flag, value]
    if args.torch_threads:
        server += ["--torch-threads", str(args.torch_threads)]
    if args.no_packed_weights:
        server += ["--no-packed-weights"]
    if args.no_cpu_kernels:
        server += ["--no-cpu-kernels"]
    if args.drain_grace is not None:
        server += ["--drain-grace", str(args.drain_grace)]
    translator = [*protoserve_command, "translate", "--host", args.host, "--port", str(args.http_port)]
    translator += ["--upstream", f"{grpc_host}:{args.grpc_port}"]
    if children_key_file is not None:
        server += ["--api-key-file", str(children_key_file)]
        translator += ["--api-key-file", str(children_key_file), "--upstream-api-key-file", str(children_key_file)]
    return UpPlan(
        server_command=tuple(server),
        translator_command=tuple(translator),
        grpc_target=f"{grpc_host}:{args.grpc_port}",
        http_host=reachable,
        http_port=args.http_port,
        api_key=args.api_key or (given_key_file.first_key if given_key_file else None),
        startup_timeout=args.startup_timeout,
        stop_timeout=stop_timeout,
    )


def grpc_health_check(target: str, api_key: str | None) -> Callable[[], bool]:
    """A probe that is True once the server at `target` reports SERVING."""
    from protoserve.client import ProtoserveClient, ProtoserveError

    client = ProtoserveClient(target, api_key=api_key)

    def is_serving() -> bool:
        try:
            return client.health(timeout=1.0)
        except ProtoserveError:
            return False

    return is_serving


def run_plan(plan: UpPlan, *, server_ready: Callable[[], bool] | None = None) -> int:
    """Start, watch and stop both children as the module docstring says; returns the exit status."""
    supervisor = Supervisor(stop_timeout=plan.stop_timeout)
    with supervisor.handling_signals():
        try:
            server = supervisor.start(ChildProcess("server", plan.server_command))
        except OSError as error:
            return supervisor.shut_down(reason=f"cannot start the server: {error}")
        probe = server_ready or grpc_health_check(plan.grpc_target, plan.api_key)
        if not supervisor.wait_until(probe, server, plan.startup_timeout):
            what = f"the gRPC server at {plan.grpc_target}"
            return supervisor.shut_down(reason=supervisor.not_ready_reason(server, what, plan.startup_timeout))
        try:
            translator = supervisor.start(ChildProcess("translator", plan.translator_command))
        except OSError as error:
            return supervisor.shut_down(reason=f"cannot start the translator: {error}")

        def http_ready() -> bool:
            return wait_for_tcp_port(plan.http_host, plan.http_port, timeout=0.5)

        if not supervisor.wait_until(http_ready, translator, plan.startup_timeout):
            what = f"the translator at {plan.http_url}"
            return supervisor.shut_down(reason=supervisor.not_ready_reason(translator, what, plan.startup_timeout))
        print(
            f"protoserve is up: gRPC at {plan.grpc_target}, OpenAI-compatible API at {plan.http_url}/v1\n"
            f"  try: protoserve chat --url {plan.http_url}   (Ctrl-C stops both)",
            flush=True,
        )
        return supervisor.watch()


def run(args: argparse.Namespace) -> int:
    from protoserve.client.cli.models import DemoModelsUnavailable

    with private_key_file(args.api_key) as api_key_file:
        try:
            plan = plan_children(args, api_key_file=api_key_file)
        except DemoModelsUnavailable as error:
            print(f"protoserve up: {error}; or name models with --model PATH", file=sys.stderr)
            return 1
        return run_plan(plan)


@contextlib.contextmanager
def private_key_file(api_key: str | None) -> Iterator[Path | None]:
    """A file only this user can read holding `api_key`, removed afterwards; None without a key."""
    if not api_key:
        yield None
        return
    descriptor, name = tempfile.mkstemp(prefix="protoserve-api-key-")
    try:
        with os.fdopen(descriptor, "w") as handle:  # mkstemp creates it with mode 0600
            handle.write(api_key + "\n")
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
