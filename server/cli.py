"""`protoserve serve`: the flags, and running the server until a signal drains it.

Importing this module is cheap (no torch, no grpc server code); `run_serve` imports the server.
Exit codes: 0 after a clean drain, 1 when startup fails or a second signal aborts, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from contextlib import suppress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protoserve.server.config import ServerConfig
    from protoserve.server.registry import ModelRegistry

logger = logging.getLogger("protoserve.server.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every `protoserve serve` flag to `parser`."""
    models = parser.add_argument_group("models")
    models.add_argument("--model", action="append", metavar="[ID=]PATH",
                        help="a model folder (causal LM, VLM or whisper), or a hub id in the local cache; "
                             "repeatable, the first is the default")
    models.add_argument("--gguf-file", metavar="NAME", help="the GGUF file inside the (single) model folder")
    models.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    models.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    models.add_argument("--quantization", choices=("none", "4bit", "8bit"), default="none")
    models.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the weights")
    models.add_argument("--enable-on-demand-loading", action="store_true",
                        help="let LoadModel/UnloadModel and requests naming a local model load it")
    models.add_argument("--idle-unload-seconds", type=float, metavar="S",
                        help="unload on-demand models idle this long (default: never)")

    listen = parser.add_argument_group("listening")
    listen.add_argument("--host", default="127.0.0.1")
    listen.add_argument("--port", type=int, default=50051, help="TCP port; 0 = none (unix socket only)")
    listen.add_argument("--unix-socket", metavar="PATH")
    listen.add_argument("--drain-grace", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long in-flight requests may take to finish")
    listen.add_argument("--metrics-host", default="127.0.0.1")
    listen.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; 0 = off")
    listen.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")

    security = parser.add_argument_group("security")
    security.add_argument("--api-key", action="append", metavar="KEY", help="accepted API key; repeatable")
    security.add_argument("--api-key-file", metavar="PATH", help="file of accepted API keys, one a line")
    security.add_argument("--tls-cert", metavar="PEM")
    security.add_argument("--tls-key", metavar="PEM")
    security.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by it (mTLS)")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-waiting", type=int, default=256, metavar="N",
                        help="queued requests before RESOURCE_EXHAUSTED")
    engine.add_argument("--kv-cache-bytes", type=int, metavar="N",
                        help="bytes of KV cache (default: the engine's choice for the device)")
    engine.add_argument("--kv-cache-memory-fraction", type=float, default=0.9, metavar="F",
                        help="GPU: share of free memory for the KV cache when no bytes are given")
    engine.add_argument("--max-num-seqs", type=int, default=64, metavar="N")
    engine.add_argument("--max-batched-tokens", type=int, default=512, metavar="N")
    engine.add_argument("--block-size", type=int, default=16, metavar="N")
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--max-n", type=int, default=8, metavar="N", help="most choices per request")
    engine.add_argument("--speculative-tokens", type=int, default=3, metavar="N",
                        help="draft tokens per step looked up in the sequence itself, for greedy requests (0: off)")
    engine.add_argument("--speculative-max-seqs", type=int, default=1, metavar="N",
                        help="speculate only while at most N sequences run")
    engine.add_argument("--no-packed-weights", action="store_true",
                        help="CPU: keep the dense weights only (no oneDNN-packed copies, which cost the "
                             "weights' size again in memory and make products ~2x faster on AVX-512 CPUs)")
    engine.add_argument("--no-cpu-kernels", action="store_true",
                        help="CPU: do not build or use protoserve's C++ kernels (decode attention over the "
                             "paged cache, one-pass norms, rotary embeddings and activation); torch's ops only")
    engine.add_argument("--torch-threads", type=int, metavar="N",
                        help="CPU threads for the model's math (default: torch's choice, one per core); fewer "
                             "than the cores leaves room for gRPC, the translator and other processes")

    requests = parser.add_argument_group("requests")
    requests.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    requests.add_argument("--image-url-allow-host", action="append", metavar="HOST",
                          help="with --allow-remote-images, fetch only from these hosts; repeatable")
    requests.add_argument(
        "--tool-parser", choices=("auto", "hermes", "llama3", "mistral", "mistral_v11", "none"), default="auto"
    )
    requests.add_argument("--max-audio-bytes", type=int, metavar="N", help="largest audio upload")
    requests.add_argument("--max-audio-seconds", type=float, metavar="S", help="longest audio after decoding")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    from protoserve.server.config import ConfigError, ServerConfig, check_single_process_launch

    _configure_logging(args.log_level)
    try:
        check_single_process_launch(os.environ)
        config = ServerConfig.from_args(args)
    except ConfigError as exc:
        print(f"protoserve serve: error: {exc}", file=sys.stderr)
        return 2
    from protoserve.server.engine import compute_threads

    compute_threads.reserve(config.torch_threads)
    return asyncio.run(serve(config, freeze_long_lived_objects=True))


async def serve(
    config: ServerConfig, registry: ModelRegistry | None = None, freeze_long_lived_objects: bool = False
) -> int:
    """Start the server, print the serving line, drain on the first signal, abort on the second.
    Must run in the main thread (signal handlers); `registry` defaults to one built from `config`.
    `freeze_long_lived_objects` (the `protoserve serve` process) keeps the cycle collector off the
    loaded models once they are warm (gc_freeze)."""
    from protoserve.server import gc_freeze
    from protoserve.server.app import start_server
    from protoserve.server.lifecycle import install_signal_handlers

    loop = asyncio.get_running_loop()
    drain_requested = asyncio.Event()
    abort_requested = asyncio.Event()
    remove_handlers = install_signal_handlers(loop, drain_requested.set, abort_requested.set)
    try:
        starting = asyncio.ensure_future(start_server(config, registry))
        signalled = asyncio.ensure_future(drain_requested.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            logger.warning("stopping before startup finished")
            starting.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await starting
            return 1
        signalled.cancel()
        try:
            running = starting.result()
        except Exception as exc:
            logger.debug("startup failed", exc_info=exc)
            print(f"protoserve serve: error: {exc} (--log-level DEBUG shows the traceback)", file=sys.stderr)
            return 1
        if freeze_long_lived_objects:
            gc_freeze.freeze_long_lived()
        print(f"protoserve serving on {', '.join(running.addresses)}", flush=True)
        await drain_requested.wait()
        draining = asyncio.ensure_future(running.drain(config.drain_grace_seconds))
        aborting = asyncio.ensure_future(abort_requested.wait())
        await asyncio.wait({draining, aborting}, return_when=asyncio.FIRST_COMPLETED)
        if draining.done():
            aborting.cancel()
            draining.result()
            return 0
        draining.cancel()
        await running.abort()
        return 1
    finally:
        remove_handlers()
        if freeze_long_lived_objects:
            gc_freeze.stop_freezing()
