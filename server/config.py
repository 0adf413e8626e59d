"""The server's whole configuration: one frozen object built from the `protoserve serve` flags.

Everything the runtime needs travels in `ServerConfig` (no parameter threading, nothing read from
the environment at import time). It embeds the engine's `EngineConfig`, the request limits and the
image policy, which belong to other modules and are imported only when a config is built.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from protoserve.server.auth import read_api_key_file
from protoserve.server.engine.api import EngineConfig
from protoserve.server.tls import TLSConfig, TLSConfigError

if TYPE_CHECKING:
    from protoserve.server.limits import RequestLimits
    from protoserve.server.media.images import ImagePolicy


class ConfigError(ValueError):
    """The flags do not make a usable configuration; the message names the flag."""


@dataclass(frozen=True)
class ModelSpec:
    """One `--model` entry: the id requests use and where the weights are."""

    model_id: str
    path: str
    gguf_file: str | None = None

    @staticmethod
    def parse(value: str, gguf_file: str | None = None) -> ModelSpec:
        """`PATH` (id = the folder's name) or `ID=PATH`. A value that exists as a path is a path."""
        value = value.strip()
        if not value:
            raise ConfigError("--model: empty value")
        if "=" in value and not os.path.exists(value):
            model_id, path = (part.strip() for part in value.split("=", 1))
            if not model_id or not path:
                raise ConfigError(f"--model {value!r}: expected PATH or ID=PATH")
            return ModelSpec(model_id, path, gguf_file)
        model_id = Path(value.rstrip("/")).name or value
        return ModelSpec(model_id, value, gguf_file)


def _default_limits() -> RequestLimits:
    from protoserve.server.limits import RequestLimits

    return RequestLimits()


def _default_image_policy() -> ImagePolicy:
    from protoserve.server.media.images import ImagePolicy

    return ImagePolicy()


@dataclass(frozen=True)
class ServerConfig:
    """Everything `protoserve serve` was told. Defaults match the flags' defaults."""

    models: tuple[ModelSpec, ...] = ()
    host: str = "127.0.0.1"
    port: int | None = 50051  # None: no TCP listener; 0: any free port (`--port 0` means None)
    unix_socket: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "none"
    trust_remote_code: bool = False
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never printed
    tls: TLSConfig | None = None
    drain_grace_seconds: float = 30.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port (`--metrics-port 0` is off)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: RequestLimits = field(default_factory=_default_limits)
    image_policy: ImagePolicy = field(default_factory=_default_image_policy)
    enable_on_demand_loading: bool = False
    idle_unload_seconds: float | None = None  # on-demand models only; None: never
    tool_parser: str = "auto"
    log_level: str = "INFO"
    warm_up: bool = True  # run one tiny request through each model before reporting SERVING
    torch_threads: int | None = None  # CPU threads for the model's math; None: torch's default

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: must be between 0 and 65535")
        if self.port is None and not self.unix_socket:
            raise ConfigError("--port 0 turns TCP off, so --unix-socket is required")
        if self.drain_grace_seconds < 0:
            raise ConfigError(f"--drain-grace {self.drain_grace_seconds}: must be 0 or more")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port}: must be between 0 and 65535")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"--torch-threads {self.torch_threads}: must be 1 or more")
        if self.idle_unload_seconds is not None and self.idle_unload_seconds <= 0:
            raise ConfigError(f"--idle-unload-seconds {self.idle_unload_seconds}: must be more than 0")
        ids = [spec.model_id for spec in self.models]
        duplicates = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
        if duplicates:
            raise ConfigError(f"--model: the id(s) {', '.join(duplicates)} are given twice; use ID=PATH")

    @property
    def addresses(self) -> list[str]:
        """The addresses to listen on, as gRPC writes them."""
        addresses = []
        if self.port is not None:
            host = f"[{self.host}]" if ":" in self.host else self.host
            addresses.append(f"{host}:{self.port}")
        if self.unix_socket:
            addresses.append(f"unix:{self.unix_socket}")
        return addresses

    @staticmethod
    def from_args(args: argparse.Namespace) -> ServerConfig:
        """Build and check the config from parsed `protoserve serve` flags."""
        if not args.model and not args.enable_on_demand_loading:
            raise ConfigError("give at least one --model (or --enable-on-demand-loading)")
        if args.gguf_file and len(args.model or []) != 1:
            raise ConfigError("--gguf-file applies to exactly one --model")
        models = tuple(ModelSpec.parse(value, args.gguf_file) for value in args.model or [])
        try:
            tls = TLSConfig.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
            api_keys = list(args.api_key or [])
            if args.api_key_file:
                api_keys += read_api_key_file(Path(args.api_key_file))
        except (TLSConfigError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        if any(not key.strip() for key in api_keys):
            raise ConfigError("--api-key: a key is empty")
        engine = EngineConfig(
            block_size=_positive(args.block_size, "--block-size"),
            kv_cache_bytes=_positive(args.kv_cache_bytes, "--kv-cache-bytes") if args.kv_cache_bytes else None,
            kv_cache_memory_fraction=_fraction(args.kv_cache_memory_fraction),
            max_num_seqs=_positive(args.max_num_seqs, "--max-num-seqs"),
            max_num_batched_tokens=_positive(args.max_batched_tokens, "--max-batched-tokens"),
            max_waiting_requests=_positive(args.max_waiting, "--max-waiting"),
            enable_prefix_caching=not args.no_prefix_caching,
            max_n=_positive(args.max_n, "--max-n"),
            speculative_tokens=_not_negative(args.speculative_tokens, "--speculative-tokens"),
            speculative_max_seqs=_positive(args.speculative_max_seqs, "--speculative-max-seqs"),
            packed_weights=not args.no_packed_weights,
            cpu_kernels=not args.no_cpu_kernels,
        )
        return ServerConfig(
            models=models,
            host=args.host,
            port=args.port or None,
            unix_socket=args.unix_socket,
            dtype=args.dtype,
            device=args.device,
            quantization=args.quantization,
            trust_remote_code=args.trust_remote_code,
            api_keys=tuple(key.strip() for key in api_keys),
            tls=tls,
            drain_grace_seconds=args.drain_grace,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port or None,
            engine=engine,
            limits=_limits_from_args(args),
            image_policy=_image_policy_from_args(args),
            enable_on_demand_loading=args.enable_on_demand_loading,
            idle_unload_seconds=args.idle_unload_seconds,
            tool_parser=args.tool_parser,
            log_level=args.log_level.upper(),
            torch_threads=getattr(args, "torch_threads", None),
        )


def check_single_process_launch(environment: Mapping[str, str]) -> None:
    """Refuse a multi-process launch (torchrun sets WORLD_SIZE): a server runs each model in one
    process on one device. Tensor and pipeline parallelism are not supported by the engine: its
    paged KV cache holds every head of every layer on the model's one device, and nothing keeps
    several ranks stepping through the same schedule."""
    value = environment.get("WORLD_SIZE", "").strip()
    if not value:
        return
    try:
        world_size = int(value)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a number; protoserve serve runs as one process") from None
    if world_size == 1:
        return
    raise ConfigError(
        f"launched as one of WORLD_SIZE={world_size} processes (torchrun?), but protoserve serve runs each "
        "model in one process on one device: tensor and pipeline parallelism are not supported. Run one "
        "`protoserve serve` per GPU and balance over them (docs/deploying.md, scale-out), or fit the model "
        "on one device with --quantization 4bit or 8bit"
    )


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"{flag} {value}: must be 1 or more")
    return value


def _not_negative(value: int, flag: str) -> int:
    if value < 0:
        raise ConfigError(f"{flag} {value}: must be 0 or more")
    return value


def _fraction(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--kv-cache-memory-fraction {value}: must be in (0, 1]")
    return value


def _limits_from_args(args: argparse.Namespace) -> RequestLimits:
    from dataclasses import replace

    limits = _default_limits()
    changes: dict[str, object] = {"max_n": _positive(args.max_n, "--max-n")}
    if args.max_audio_bytes is not None:
        changes["max_audio_bytes"] = _positive(args.max_audio_bytes, "--max-audio-bytes")
    if args.max_audio_seconds is not None:
        if args.max_audio_seconds <= 0:
            raise ConfigError(f"--max-audio-seconds {args.max_audio_seconds}: must be more than 0")
        changes["max_audio_seconds"] = args.max_audio_seconds
    return replace(limits, **changes)


def _image_policy_from_args(args: argparse.Namespace) -> ImagePolicy:
    from dataclasses import replace

    allowed_hosts = tuple(host.strip().lower() for host in args.image_url_allow_host or [] if host.strip())
    if allowed_hosts and not args.allow_remote_images:
        raise ConfigError("--image-url-allow-host needs --allow-remote-images")
    return replace(_default_image_policy(), allow_remote=args.allow_remote_images, allowed_hosts=allowed_hosts)
