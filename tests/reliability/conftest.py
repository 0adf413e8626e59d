"""Fixtures of the reliability suite: the tiny model folder and the figures recorder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability.recorder import ReliabilityRecorder, report_path
from reliability.stack import build_tiny_chat_model


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def reliability_recorder() -> Iterator[ReliabilityRecorder]:
    recorder = ReliabilityRecorder(report_path())
    yield recorder
    recorder.write()
