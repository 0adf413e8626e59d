"""`protoserve serve` flags become one ServerConfig; bad flags are clear errors; SIGTERM drains and exits."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from protoserve.server.cli import add_serve_arguments, run_serve, serve
from protoserve.server.config import ConfigError, ModelSpec, ServerConfig


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(flags))


def test_flags_build_one_config(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("from-file\n")
    config = ServerConfig.from_args(
        _args(
            "--model",
            str(tmp_path),
            "--model",
            "speech=/models/whisper",
            "--port",
            "0",
            "--unix-socket",
            "/tmp/p.sock",
            "--api-key",
            "k1",
            "--api-key-file",
            str(key_file),
            "--max-waiting",
            "3",
            "--max-num-seqs",
            "4",
            "--block-size",
            "32",
            "--no-prefix-caching",
            "--max-n",
            "2",
            "--kv-cache-bytes",
            "1048576",
            "--allow-remote-images",
            "--image-url-allow-host",
            "Images.Example.com",
            "--tool-parser",
            "hermes",
            "--metrics-port",
            "9100",
            "--drain-grace",
            "5",
            "--log-level",
            "debug",
            "--max-audio-bytes",
            "1000",
            "--speculative-tokens",
            "0",
            "--speculative-max-seqs",
            "2",
            "--no-packed-weights",
            "--no-cpu-kernels",
        )
    )
    assert config.models == (ModelSpec(tmp_path.name, str(tmp_path)), ModelSpec("speech", "/models/whisper"))
    assert config.port is None and config.addresses == ["unix:/tmp/p.sock"]
    assert config.api_keys == ("k1", "from-file")
    assert "k1" not in repr(config)
    engine = config.engine
    assert (engine.max_waiting_requests, engine.max_num_seqs, engine.block_size) == (3, 4, 32)
    assert not engine.enable_prefix_caching and engine.max_n == 2 and engine.kv_cache_bytes == 1048576
    assert config.limits.max_n == 2 and config.limits.max_audio_bytes == 1000
    assert (engine.speculative_tokens, engine.speculative_max_seqs) == (0, 2)
    assert not engine.packed_weights and not engine.cpu_kernels
    assert config.image_policy.allow_remote and config.image_policy.allowed_hosts == ("images.example.com",)
    assert (config.tool_parser, config.metrics_port, config.drain_grace_seconds, config.log_level) == (
        "hermes",
        9100,
        5.0,
        "DEBUG",
    )


def test_defaults() -> None:
    config = ServerConfig.from_args(_args("--model", "/models/tiny"))
    assert config.addresses == ["127.0.0.1:50051"]
    assert config.metrics_port is None and config.tls is None and config.api_keys == ()
    assert config.drain_grace_seconds == 30.0 and config.engine.max_waiting_requests == 256
    assert (config.engine.speculative_tokens, config.engine.speculative_max_seqs) == (3, 1)
    assert config.engine.packed_weights and config.engine.cpu_kernels


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "at least one --model"),
        (("--model", "a", "--model", "b", "--gguf-file", "x.gguf"), "exactly one --model"),
        (("--model", "/m/a", "--model", "other/a"), "given twice"),
        (("--model", "=/path"), "expected PATH or ID=PATH"),
        (("--model", "m", "--port", "0"), "--unix-socket is required"),
        (("--model", "m", "--port", "70000"), "between 0 and 65535"),
        (("--model", "m", "--tls-cert", "c.pem"), "both --tls-cert and --tls-key"),
        (("--model", "m", "--max-waiting", "0"), "--max-waiting 0"),
        (("--model", "m", "--kv-cache-memory-fraction", "1.5"), "(0, 1]"),
        (("--model", "m", "--drain-grace", "-1"), "--drain-grace"),
        (("--model", "m", "--image-url-allow-host", "x.com"), "needs --allow-remote-images"),
        (("--model", "m", "--api-key-file", "/nonexistent/keys"), "cannot read the API key file"),
        (("--model", "m", "--idle-unload-seconds", "0"), "--idle-unload-seconds"),
        (("--model", "m", "--speculative-tokens", "-1"), "--speculative-tokens -1: must be 0 or more"),
        (("--model", "m", "--speculative-max-seqs", "0"), "--speculative-max-seqs 0"),
    ],
)
def test_bad_flags_are_config_errors(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig.from_args(_args(*flags))
    assert message in str(caught.value)


def test_run_serve_returns_2_on_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_serve(_args("--model", "m", "--port", "0")) == 2
    assert "protoserve serve: error: --port 0" in capsys.readouterr().err


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, protoserve.server.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


SERVE_SCRIPT = """
import argparse, sys
from protoserve.server.cli import add_serve_arguments, run_serve, serve
parser = argparse.ArgumentParser()
add_serve_arguments(parser)
sys.exit(run_serve(parser.parse_args(sys.argv[1:])))
"""


def test_serve_process_prints_its_address_and_exits_on_sigterm() -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, "--enable-on-demand-loading", "--port", str(port), "--drain-grace", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == f"protoserve serving on 127.0.0.1:{port}", process.stderr.read() if not line else line
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 2 + 3
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_serve_reports_a_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ServerConfig(models=(ModelSpec("absent", str(tmp_path / "absent")),), port=0)
    assert await serve(config) == 1
    error = capsys.readouterr().err
    assert "protoserve serve: error: model 'absent':" in error and "is not a folder here" in error
