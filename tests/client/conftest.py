"""Fixtures of the client tests: a scripted fake protoserve server on TCP and on a unix socket."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_fakes import FakeServer


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A fake server on a free TCP port of 127.0.0.1."""
    server = FakeServer("127.0.0.1:0").start()
    yield server
    server.stop()


@pytest.fixture
def unix_fake_server() -> Iterator[FakeServer]:
    """A fake server on a unix socket (in a short temporary folder: socket paths are limited to ~107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    server = FakeServer(f"unix:{folder / 'fake.sock'}").start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
