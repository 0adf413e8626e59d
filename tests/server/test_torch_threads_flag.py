"""`--torch-threads` on serve and up: parsed, validated and passed through.

Applying the count to the compute threads is tested in tests/engine/test_compute_threads.py.
"""

from __future__ import annotations

import argparse

import pytest
from protoserve.client.cli import up
from protoserve.server.cli import add_serve_arguments
from protoserve.server.config import ConfigError, ServerConfig


def _serve_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(["--model", "/models/chat", *flags])


def _up_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(["--model", "/models/chat", *flags])


def test_serve_flag_reaches_the_config() -> None:
    assert ServerConfig.from_args(_serve_args("--torch-threads", "1")).torch_threads == 1
    assert ServerConfig.from_args(_serve_args()).torch_threads is None


@pytest.mark.parametrize("value", ["0", "-2"])
def test_serve_refuses_fewer_than_one_thread(value: str) -> None:
    with pytest.raises(ConfigError, match="--torch-threads"):
        ServerConfig.from_args(_serve_args("--torch-threads", value))


def test_up_passes_the_flag_to_serve_only() -> None:
    plan = up.plan_children(_up_args("--torch-threads", "1"), protoserve_command=("protoserve",))
    assert plan.server_command[-2:] == ("--torch-threads", "1")
    assert "--torch-threads" not in plan.translator_command
    assert "--torch-threads" not in up.plan_children(_up_args(), protoserve_command=("protoserve",)).server_command


@pytest.mark.parametrize("value", ["0", "two"])
def test_up_refuses_a_bad_thread_count(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _up_args("--torch-threads", value)
    assert "--torch-threads" in capsys.readouterr().err
