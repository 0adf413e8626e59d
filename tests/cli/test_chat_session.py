"""The chat loop with a scripted backend, in-process: commands, kept turns, failures and Ctrl-C."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from protoserve.client.cli.chat import ChatSession, piped_lines
from protoserve.client.cli.chat_backends import ChatFailed, Message, OpenAIHttpBackend, Sampling


class ScriptedBackend:
    """Answers "fail" with ChatFailed, "interrupt" with Ctrl-C after one piece, anything else with pieces."""

    def __init__(self) -> None:
        self.seen: list[list[Message]] = []
        self.closed = 0

    def stream_reply(self, messages: list[Message]) -> Iterator[str]:
        self.seen.append([dict(message) for message in messages])
        return self._pieces(messages[-1]["content"])

    def _pieces(self, text: str) -> Iterator[str]:
        try:
            if text == "fail":
                raise ChatFailed("the model is not loaded")
            yield "you said "
            if text == "interrupt":
                raise KeyboardInterrupt
            yield text
        finally:
            self.closed += 1


def run_session(lines: str, system: str = "") -> tuple[int, str, str, ScriptedBackend]:
    backend = ScriptedBackend()
    out, notices = io.StringIO(), io.StringIO()
    status = ChatSession(backend, system=system, out=out, notices=notices).run(piped_lines(io.StringIO(lines)))
    return status, out.getvalue(), notices.getvalue(), backend


def test_turns_are_kept_and_cleared() -> None:
    status, out, notices, backend = run_session("one\n\n  two  \n/clear\nthree\n", system="sys")
    assert status == 0
    assert out.splitlines() == ["you said one", "you said two", "you said three"]
    assert backend.seen[1] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "you said one"},
        {"role": "user", "content": "two"},
    ]
    assert backend.seen[2] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "three"}]
    assert "(conversation cleared)" in notices


def test_failures_and_interrupts_drop_the_turn() -> None:
    status, out, notices, backend = run_session("fail\ninterrupt\nok\n/quit\nlater\n")
    assert status == 1
    assert "error: the model is not loaded" in notices and "(interrupted; this turn is dropped)" in notices
    assert backend.seen[-1] == [{"role": "user", "content": "ok"}]
    assert out.splitlines() == ["you said ", "you said ok"]
    assert backend.closed == 3  # every stream was closed, the interrupted one included


def test_help_and_unknown_commands_are_not_sent() -> None:
    status, out, notices, backend = run_session("/help\n/bogus\n/exit\n")
    assert status == 0 and out == "" and backend.seen == []
    assert "/clear forgets the conversation" in notices and "unknown command /bogus" in notices


def test_http_backend_url_forms() -> None:
    for url in ("127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"):
        backend = OpenAIHttpBackend(url, model="m", api_key=None, sampling=Sampling(), timeout=1)
        assert backend._base_path == "" and backend._port == 8000
    for bad in ("ftp://host", "http://", "http://host:port"):
        with pytest.raises(ChatFailed, match="--url"):
            OpenAIHttpBackend(bad, model="m", api_key=None, sampling=Sampling(), timeout=1)
