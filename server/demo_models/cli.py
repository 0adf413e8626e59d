"""The `protoserve models fetch-demo` command's body."""

from __future__ import annotations

import sys
from pathlib import Path

from protoserve.server.demo_models.errors import DemoModelFetchError
from protoserve.server.demo_models.fetch import fetch_demo_models


def run_fetch_demo(cache_dir: Path | None = None, *, progress: bool = True) -> int:
    """Fetch and convert the demo models; print `chat: PATH`, `speech: PATH`, `vision: PATH` on stdout.

    Returns the process exit status: 0 on success, 1 (with the error on stderr) when a model could
    not be fetched or converted.
    """
    try:
        models = fetch_demo_models(cache_dir, progress=progress)
    except DemoModelFetchError as error:
        print(f"protoserve: could not fetch the demo models: {error}", file=sys.stderr)
        return 1
    print(f"chat: {models.chat}")
    print(f"speech: {models.speech}")
    print(f"vision: {models.vision}")
    return 0
