"""The `protoserve` command: a registry of subcommands, each imported only when it runs.

`protoserve --help` lists every subcommand from the registry without importing any of them, so it
needs neither torch nor aiohttp. Choosing a subcommand imports its module, which adds its flags to
its parser and runs it. A subcommand whose part is not installed (e.g. `serve` without the server
extra) fails with a message naming the extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """One `protoserve NAME`: `module` defines `add_arguments(parser)` and `run(args) -> int` under the given names."""

    name: str
    summary: str
    module: str
    add_arguments: str = "add_arguments"
    run: str = "run"
    needs: str = ""  # the package extra the module comes with, e.g. "server"


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "serve",
        "serve models over gRPC (generation, transcription, models, health)",
        "protoserve.server.cli",
        "add_serve_arguments",
        "run_serve",
        needs="server",
    ),
    Subcommand(
        "translate",
        "serve the OpenAI-compatible REST API in front of a protoserve gRPC server",
        "protoserve.translator.cli",
        "add_translate_arguments",
        "run_translate",
        needs="translator",
    ),
    Subcommand("up", "run `serve` and `translate` together for local use", "protoserve.client.cli.up"),
    Subcommand("chat", "chat in the terminal with a running server", "protoserve.client.cli.chat"),
    Subcommand("models", "fetch the demo models; list a server's models", "protoserve.client.cli.models"),
    Subcommand("agent", "run MCP tools with a model, as an agent", "protoserve.client.agent.cli", needs="agent"),
)


class SubcommandUnavailable(Exception):
    """The subcommand's module cannot be imported (its extra is not installed)."""


def _load(command: Subcommand) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    try:
        module = importlib.import_module(command.module)
    except ImportError as error:
        extra = command.needs
        install = f"the {extra} extra: pip install 'protoserve[{extra}]'" if extra else f"the module {command.module}"
        raise SubcommandUnavailable(f"protoserve {command.name} needs {install} ({error})") from error
    return getattr(module, command.add_arguments), getattr(module, command.run)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("protoserve")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"protoserve {_version()}")
        parser.exit()


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """The parser; only the `chosen` subcommand's module is imported and gets its flags."""
    parser = argparse.ArgumentParser(
        prog="protoserve",
        description="Serve Hugging Face transformers models over gRPC, with an OpenAI-compatible REST API in front.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in SUBCOMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.summary, description=command.summary)
        if command.name == chosen:
            add_arguments, run = _load(command)
            add_arguments(subparser)
            subparser.set_defaults(run=run)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    names = {command.name for command in SUBCOMMANDS}
    return argv[0] if argv and argv[0] in names else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `protoserve` script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_chosen_command(arguments))
    except SubcommandUnavailable as error:
        print(f"protoserve: {error}", file=sys.stderr)
        return 1
    args = parser.parse_args(arguments)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
