"""`protoserve chat`: a terminal chat with a running server, through the OpenAI API or straight over gRPC.

Each line typed is a user message; the answer streams as it comes and the conversation is kept.
`/clear` forgets it (the --system message stays), `/exit` or end of input leaves, `/help` lists the
commands. On a terminal the prompt is `> `; with piped input there is no prompt and each answer is
one line of output, so `printf 'hi\\n/exit\\n' | protoserve chat` prints just the answers. Notices
and errors go to stderr. A failed turn is dropped from the conversation; the exit status is 1 when
any turn failed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from protoserve.client.cli.chat_backends import (
    ChatBackend,
    ChatFailed,
    GrpcBackend,
    Message,
    OpenAIHttpBackend,
    Sampling,
)

COMMANDS_HELP = "/clear forgets the conversation, /exit (or end of input) leaves, /help shows this"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the OpenAI-compatible API (default http://127.0.0.1:8000)"
    )
    where.add_argument("--grpc", metavar="HOST:PORT", help="talk to the gRPC server directly instead")
    parser.add_argument("--model", default="", help="model id (default: the server's first/default model)")
    parser.add_argument("--system", default="", metavar="TEXT", help="a system message that starts the conversation")
    parser.add_argument("--api-key", metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    parser.add_argument("--temperature", type=float, help="0 is greedy; the server's default otherwise")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-tokens", type=int, metavar="N")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--timeout", type=float, default=600.0, metavar="SECONDS", help="give up on a reply after this long"
    )


class ChatSession:
    """The conversation and the read-answer loop. `ask` returns the user's next line, or None at the end."""

    def __init__(self, backend: ChatBackend, *, system: str, out: TextIO, notices: TextIO) -> None:
        self.backend = backend
        self.system = system
        self.out = out
        self.notices = notices
        self.messages: list[Message] = []
        self.failed_turns = 0
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _notice(self, text: str) -> None:
        print(text, file=self.notices, flush=True)

    def run(self, ask: Callable[[], str | None]) -> int:
        while (line := ask()) is not None:
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/clear":
                self.clear()
                self._notice("(conversation cleared)")
            elif text == "/help":
                self._notice(COMMANDS_HELP)
            elif text.startswith("/") and " " not in text:
                self._notice(f"unknown command {text}; {COMMANDS_HELP}")
            else:
                self.turn(text)
        return 1 if self.failed_turns else 0

    def turn(self, text: str) -> None:
        """Send one user message, stream the answer, keep both when the answer arrived whole."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            stream = self.backend.stream_reply(self.messages)
            try:
                for piece in stream:
                    pieces.append(piece)
                    self.out.write(piece)
                    self.out.flush()
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()  # abandons the request when the loop was left early
        except ChatFailed as error:
            self._end_line(pieces)
            self._notice(f"error: {error}")
            self.messages.pop()
            self.failed_turns += 1
            return
        except KeyboardInterrupt:
            self._end_line(pieces)
            self._notice("(interrupted; this turn is dropped)")
            self.messages.pop()
            return
        self._end_line(pieces, always=True)
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def _end_line(self, pieces: list[str], always: bool = False) -> None:
        if pieces or always:
            self.out.write("\n")
            self.out.flush()


def terminal_prompt() -> str | None:
    """Read a line on a terminal with `> `; None on end of input or Ctrl-C."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    try:
        return input("> ")
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None


def piped_lines(stream: TextIO) -> Callable[[], str | None]:
    """Read lines from a pipe without a prompt; None at end of input."""

    def next_line() -> str | None:
        line = stream.readline()
        return line if line else None

    return next_line


def make_backend(args: argparse.Namespace) -> ChatBackend:
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    if args.grpc:
        return GrpcBackend(args.grpc, model=args.model, api_key=args.api_key, sampling=sampling, timeout=args.timeout)
    return OpenAIHttpBackend(args.url, model=args.model, api_key=args.api_key, sampling=sampling, timeout=args.timeout)


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        print("protoserve chat: --timeout must be more than 0 seconds", file=sys.stderr)
        return 2
    try:
        backend = make_backend(args)
    except ChatFailed as error:
        print(f"protoserve chat: {error}", file=sys.stderr)
        return 2
    session = ChatSession(backend, system=args.system, out=sys.stdout, notices=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"protoserve chat with {args.grpc or args.url}; {COMMANDS_HELP}", file=sys.stderr)
    return session.run(terminal_prompt if interactive else piped_lines(sys.stdin))
