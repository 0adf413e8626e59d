"""The real whisper tiny.en demo model through the runtime: loaded by folder type, warmed up, and
transcribing speech made by espeak-ng over TranscriptionService."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import grpc.aio
import pytest
from protoserve.server.app import start_server
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.v1 import models_pb2, models_pb2_grpc, transcription_pb2, transcription_pb2_grpc


@pytest.fixture(scope="module")
def fox_wav(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not on the PATH; run `make system-deps`")
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(path), "The quick brown fox jumps over the lazy dog."], check=True, capture_output=True
    )
    return path.read_bytes()


async def test_whisper_folder_is_served_and_transcribes(demo_models, fox_wav: bytes) -> None:  # type: ignore[no-untyped-def]
    speech_folder: Path = demo_models.speech
    config = ServerConfig(models=(ModelSpec("whisper-tiny.en", str(speech_folder)),), port=0, device="cpu")
    running = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.ports[0]}") as channel:
            info = await models_pb2_grpc.ModelServiceStub(channel).GetModel(
                models_pb2.GetModelRequest(id="whisper-tiny.en")
            )
            assert list(info.capabilities) == ["transcribe"]
            stub = transcription_pb2_grpc.TranscriptionServiceStub(channel)
            call = stub.Transcribe(transcription_pb2.TranscribeRequest(audio=fox_wav, filename="fox.wav"), timeout=60)
            chunks = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                chunks.append(chunk)
    finally:
        await running.drain(2.0)
    last = chunks[-1]
    assert last.done and last.language == "en" and 2.0 < last.duration < 6.0
    assert "quick brown fox" in last.text.lower()
    assert "".join(chunk.text_delta for chunk in chunks[:-1]).strip() == last.text.strip()
