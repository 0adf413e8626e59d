"""Real protoserve processes for the deployment tests: a tiny model folder, child environments, and
servers started the way a container starts them (as separate processes, stopped by signals).

Every process listens on 127.0.0.1 only. Each test bounds every wait with a deadline, so a process
that never comes up fails the test with its log instead of hanging the suite.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "scripts" / "container-entrypoint.sh"
VENV_BIN = Path(sys.executable).parent

TINY_VOCAB_SIZE = 256
TINY_EOS_TOKEN = "<eos>"
TINY_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
STARTUP_TIMEOUT_SECONDS = 90.0


def build_tiny_chat_model(folder: Path) -> Path:
    """Save a tiny random Llama with a word-level tokenizer ("w0".."w254", "<eos>") and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    eos_id = TINY_VOCAB_SIZE - 1
    vocab = {f"w{index}": index for index in range(eos_id)} | {TINY_EOS_TOKEN: eos_id}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS_TOKEN, unk_token="w0")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=eos_id,
        pad_token_id=0,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with the venv's bin first on PATH (the entrypoint runs `protoserve` from
    PATH), offline hub access, one thread per process (two cores are shared), then `extra`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PROTOSERVE_")}
    environment["PATH"] = f"{VENV_BIN}{os.pathsep}{environment.get('PATH', '')}"
    environment.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    environment.update(extra or {})
    return environment


def health_status(target: str, timeout: float = 2.0, service: str = "") -> int | None:
    """The grpc.health.v1 status of `target`, or None when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def http_status(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> int | None:
    """The HTTP status of a GET of `url`, or None when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def prometheus_samples(port: int) -> dict[str, float]:
    """Every sample of the /metrics page on `port`: `name{labels}` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\S+?(?:\{.*\})?) (\S+)", line)
        if match and not line.startswith("#"):
            samples[match.group(1)] = float(match.group(2))
    return samples


@dataclass
class ChildProcess:
    """One child process whose stdout and stderr go to a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @staticmethod
    def start(name: str, command: Sequence[str], environment: Mapping[str, str], log_folder: Path) -> ChildProcess:
        log_path = log_folder / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(list(command), env=dict(environment), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return ChildProcess(name, process, log_path, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Poll `ready` until true; fail with the log when the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}) before {what}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {what} not within {timeout} s:\n{self.log_text()}")
            time.sleep(0.1)

    def wait_serving(self, target: str, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        self.wait_until(
            lambda: health_status(target) == health_pb2.HealthCheckResponse.SERVING, f"SERVING on {target}", timeout
        )

    def signal(self, signal_number: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal_number)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        if not self._log.closed:
            self._log.close()
        return int(self.process.returncode)


def serve_command(model_folder: Path, grpc_port: int, metrics_port: int, *extra: str) -> list[str]:
    """`protoserve serve` of the tiny model on CPU, on 127.0.0.1, with a small KV cache."""
    return [
        str(VENV_BIN / "protoserve"),
        "serve",
        "--model",
        f"tiny={model_folder}",
        "--host",
        "127.0.0.1",
        "--port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--device",
        "cpu",
        "--kv-cache-bytes",
        str(8 << 20),
        *extra,
    ]
