"""The `protoserve translate` entry points: flags -> config, a real process, and no torch imported."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from protoserve.translator.cli import add_translate_arguments, config_from_arguments


def parse(*arguments: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_translate_arguments(parser)
    return parser.parse_args(list(arguments))


def test_defaults() -> None:
    args = parse()
    assert (args.upstream, args.host, args.port, args.max_body_bytes) == (
        "127.0.0.1:50051",
        "127.0.0.1",
        8000,
        32 << 20,
    )
    config = config_from_arguments(args)
    assert config.api_keys == () and config.cors_origins == () and config.upstream_tls is None


def test_keys_origins_and_tls(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\nfile-key\n\n")
    config = config_from_arguments(
        parse(
            "--api-key",
            "a",
            "--api-key-file",
            str(key_file),
            "--cors-origin",
            "https://x",
            "--upstream-api-key",
            "up",
            "--upstream-tls-ca",
            str(key_file),
            "--max-body-bytes",
            "100",
            "--upstream",
            "unix:/tmp/s.sock",
        )
    )
    assert config.api_keys == ("a", "file-key") and config.cors_origins == ("https://x",)
    assert config.upstream_api_key == "up" and config.upstream_tls is not None and config.max_body_bytes == 100


def test_upstream_key_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# the server's keys\nfirst-key\nsecond-key\n")
    config = config_from_arguments(parse("--upstream-api-key-file", str(key_file)))
    assert config.upstream_api_key == "first-key"


@pytest.mark.parametrize(
    "arguments",
    [
        ("--api-key-file", "/nonexistent/keys"),
        ("--max-body-bytes", "0"),
        ("--upstream-tls-cert", "/a.pem"),
        ("--upstream-api-key-file", "/nonexistent/keys"),
        ("--upstream-api-key-file", "/dev/null"),
        ("--upstream-api-key", "k", "--upstream-api-key-file", "/dev/null"),
    ],
)
def test_bad_settings_are_refused(arguments: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        config_from_arguments(parse(*arguments))


def test_translator_process_starts_and_stops_without_torch() -> None:
    script = (
        "import sys, argparse\n"
        "from protoserve.translator.cli import add_translate_arguments, run_translate\n"
        "import protoserve.translator.app\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'translator imported torch'\n"
        "parser = argparse.ArgumentParser(); add_translate_arguments(parser)\n"
        "sys.exit(run_translate(parser.parse_args(['--port', '0', '--upstream', '127.0.0.1:1'])))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert line.startswith("protoserve translator listening on http://127.0.0.1:"), (
            process.stderr.read() if process.stderr else ""
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
