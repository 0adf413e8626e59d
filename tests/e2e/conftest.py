"""The end-to-end stack: one real server (chat, speech and vision demo models) and one real translator
for the whole session, stopped with SIGTERM at the end."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from e2e.stack import DemoStack, start_server_process, start_translator_process, stop_process

if TYPE_CHECKING:
    from protoserve.server.demo_models import DemoModels


@pytest.fixture(scope="session")
def demo_stack(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    folder = tmp_path_factory.mktemp("e2e-stack")
    models = [f"chat={demo_models.chat}", f"speech={demo_models.speech}", f"vision={demo_models.vision}"]
    server = start_server_process(models, folder / "server.sock", folder / "server.log")
    try:
        translator = start_translator_process(server.address, folder / "translator.log")
    except BaseException:
        stop_process(server)
        raise
    try:
        health = urllib.request.urlopen(f"{translator.address}/health", timeout=30)
        assert health.status == 200, "the translator reports its upstream healthy"
        yield DemoStack(server, translator, "chat", "speech", "vision")
    finally:
        translator_exit, server_exit = stop_process(translator), stop_process(server)
    assert (translator_exit, server_exit) == (0, 0), "SIGTERM must stop both processes cleanly"


@pytest.fixture(scope="session")
def spoken_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16 kHz mono WAV of espeak-ng saying a sentence with "quick brown fox" in it."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox are needed (make system-deps installs them)")
    folder = tmp_path_factory.mktemp("speech")
    raw, resampled = folder / "raw.wav", folder / "clip.wav"
    sentence = "The quick brown fox jumps over the lazy dog."
    subprocess.run(["espeak-ng", "-w", str(raw), sentence], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(resampled)], check=True, capture_output=True)
    return resampled
