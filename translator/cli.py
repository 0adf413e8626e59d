"""`protoserve translate`: run the OpenAI-compatible translator in front of a protoserve gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from protoserve.client.api_keys import api_keys_in
from protoserve.client.channel import TLSOptions
from protoserve.translator.config import MEBIBYTE, TranslatorConfig
from protoserve.translator.server import start_translator


def add_translate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `protoserve translate`."""
    parser.add_argument(
        "--upstream",
        default="127.0.0.1:50051",
        help="gRPC target of the protoserve server: HOST:PORT, unix:PATH or dns:///NAME:PORT",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0 picks a free one)")
    parser.add_argument("--api-key", action="append", default=[], help="a key clients must send (repeatable)")
    parser.add_argument("--api-key-file", type=Path, help="a file of keys clients may send, one a line")
    parser.add_argument("--upstream-api-key", help="the key sent to the gRPC server as authorization metadata")
    parser.add_argument(
        "--upstream-api-key-file",
        type=Path,
        help="a file whose first key is sent to the gRPC server (keeps the key off the command line)",
    )
    parser.add_argument("--upstream-tls-ca", type=Path, help="PEM CA certificate to verify the server (enables TLS)")
    parser.add_argument("--upstream-tls-cert", type=Path, help="PEM client certificate for mTLS")
    parser.add_argument("--upstream-tls-key", type=Path, help="PEM client key for mTLS")
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="an origin browsers may call from (repeatable); CORS is off without one",
    )
    parser.add_argument("--max-body-bytes", type=int, default=32 * MEBIBYTE, help="largest request body accepted")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _read_keys(path: Path) -> list[str]:
    return api_keys_in(path.read_text(encoding="utf-8"))


def config_from_arguments(args: argparse.Namespace) -> TranslatorConfig:
    """The TranslatorConfig the flags describe; ValueError for contradictory or unreadable settings."""
    keys = list(args.api_key)
    if args.api_key_file is not None:
        try:
            keys += _read_keys(args.api_key_file)
        except OSError as error:
            raise ValueError(f"cannot read --api-key-file: {error.strerror}") from None
    upstream_key = args.upstream_api_key
    if args.upstream_api_key_file is not None:
        if upstream_key:
            raise ValueError("give --upstream-api-key or --upstream-api-key-file, not both")
        try:
            file_keys = _read_keys(args.upstream_api_key_file)
        except OSError as error:
            raise ValueError(f"cannot read --upstream-api-key-file: {error.strerror}") from None
        if not file_keys:
            raise ValueError(f"--upstream-api-key-file {args.upstream_api_key_file} holds no key")
        upstream_key = file_keys[0]
    if args.max_body_bytes <= 0:
        raise ValueError("--max-body-bytes must be positive")
    if (args.upstream_tls_cert is None) != (args.upstream_tls_key is None):
        raise ValueError("--upstream-tls-cert and --upstream-tls-key go together")
    tls = None
    if args.upstream_tls_ca or args.upstream_tls_cert:
        tls = TLSOptions(
            ca_cert=args.upstream_tls_ca, client_cert=args.upstream_tls_cert, client_key=args.upstream_tls_key
        )
    return TranslatorConfig(
        upstream=args.upstream,
        api_keys=tuple(keys),
        upstream_api_key=upstream_key,
        upstream_tls=tls,
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
    )


async def _serve(config: TranslatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    translator = await start_translator(config, host, port)
    print(f"protoserve translator listening on {translator.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await translator.stop()


def run_translate(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_arguments(args)
    except ValueError as error:
        logging.getLogger(__name__).error("%s", error)
        return 2
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except OSError as error:
        logging.getLogger(__name__).error("cannot listen on %s:%s: %s", args.host, args.port, error.strerror)
        return 1
    return 0
