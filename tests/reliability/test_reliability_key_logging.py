"""API keys never reach the logs of the real processes, even at DEBUG level and on failed attempts.

`protoserve serve` and `protoserve translate` run as subprocesses with keys from files, take right,
wrong and nearly-right keys over REST and gRPC, and their whole output is searched for every key
and every key fragment that was sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from e2e.stack import StackProcess, start_server_process, start_translator_process, stop_process
from protoserve.v1 import models_pb2, models_pb2_grpc

from reliability.recorder import ReliabilityRecorder

try:  # the HTTP client the openai SDK brings (renamed httpx2 in recent releases)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases
    import httpx  # type: ignore[no-redef]

CLIENT_KEY = "sk-client-0f9e8d7c6b5a4f3e"
SERVER_KEY = "sk-server-1a2b3c4d5e6f7a8b"
NEAR_MISSES = [CLIENT_KEY[:-1] + "X", SERVER_KEY[:-1] + "Y", "sk-wrong-9999"]


@pytest.fixture(scope="module")
def keyed_processes(
    tiny_model_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StackProcess, StackProcess]]:
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "client-keys").write_text(f"# clients\n{CLIENT_KEY}\n")
    (folder / "server-keys").write_text(f"{SERVER_KEY}\n")
    server = start_server_process(
        [f"tiny={tiny_model_folder}"], folder / "server.sock", folder / "server.log",
        extra=["--api-key-file", str(folder / "server-keys"), "--log-level", "DEBUG"],
    )  # fmt: skip
    translator = start_translator_process(
        server.address, folder / "translator.log",
        ["--api-key-file", str(folder / "client-keys"), "--upstream-api-key-file", str(folder / "server-keys"),
         "--log-level", "debug"],
    )  # fmt: skip
    yield server, translator
    stop_process(translator)
    stop_process(server)


def test_keys_never_logged(
    keyed_processes: tuple[StackProcess, StackProcess], reliability_recorder: ReliabilityRecorder
) -> None:
    server, translator = keyed_processes
    body = {"model": "tiny", "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 2}
    attempts = 0
    with httpx.Client(base_url=translator.address, timeout=60) as http:
        for key in [CLIENT_KEY, *NEAR_MISSES, SERVER_KEY]:
            for target in ("/v1/chat/completions", "/v1/models"):
                headers = {"Authorization": f"Bearer {key}"}
                if target == "/v1/models":
                    response = http.get(target, headers=headers)
                else:
                    response = http.post(target, json=body, headers=headers)
                attempts += 1
                assert (response.status_code == 200) == (key == CLIENT_KEY), (key, target, response.status_code)
        assert http.get("/v1/models", params={"api_key": "x"}).status_code == 401
    with grpc.insecure_channel(server.address) as channel:
        stub = models_pb2_grpc.ModelServiceStub(channel)
        for key in [SERVER_KEY, *NEAR_MISSES, CLIENT_KEY]:
            try:
                stub.ListModels(models_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),))
                accepted = True
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                accepted = False
            attempts += 1
            assert accepted == (key == SERVER_KEY)
    logs = server.log_text() + translator.log_text()
    assert "DEBUG" in logs, "the processes logged at DEBUG level, so the search below means something"
    for secret in [CLIENT_KEY, SERVER_KEY, *NEAR_MISSES]:
        assert secret not in logs and secret[4:20] not in logs, f"{secret[:6]}... appears in the logs"

    reliability_recorder.record(
        "security.keys_not_logged",
        "Security",
        "right, wrong and nearly-right API keys sent over REST and gRPC to real processes logging at DEBUG: "
        "only the right key was accepted, and no key or key fragment appeared in either process's output",
        inputs_tried=attempts,
        bypasses=0,
    )
