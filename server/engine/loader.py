"""Load a model folder (or a hub-cache entry) into a `LoadedModel` the engine can drive.

Local folders only, plus the local hub cache (`HF_HUB_OFFLINE` is respected: nothing is
downloaded). dtype "auto" is float32 on CPU (faster than bfloat16 on CPUs without AMX) and
bfloat16 on CUDA. Speech models are loaded by the transcription module, not here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from protoserve.server.engine.errors import ModelLoadError, UnsupportedModelError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
QUANTIZATIONS = {"4bit": "bnb-4bit", "8bit": "bnb-8bit"}
SPEECH_MODEL_TYPES = frozenset({"whisper", "wav2vec2", "speech_to_text", "moonshine", "seamless_m4t"})


@dataclass(frozen=True)
class LoadOptions:
    path: str
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None  # "4bit" or "8bit" (bitsandbytes)
    gguf_file: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine, with what the servers need to describe it."""

    model: Any
    tokenizer: Any
    processor: Any  # None for text-only models
    model_id: str
    architecture: str
    dtype: str
    device: str
    quantization: str  # "none", "bnb-4bit", "bnb-8bit", "gguf"
    modalities: tuple[str, ...]
    context_length: int
    eos_token_ids: frozenset[int]
    created: int


def resolve_folder(path: str) -> Path:
    """A local folder, or the snapshot of a repo id already in the local hub cache."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelLoadError(f"{path} is a file; pass the model's folder (and gguf_file for a GGUF file)")
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path, local_files_only=True))
        except Exception as error:  # the hub raises several kinds for "not in the cache"
            raise ModelLoadError(
                f"{path} is neither a local folder nor in the local hub cache ({type(error).__name__}); "
                "nothing is downloaded: fetch it first"
            ) from error
    raise ModelLoadError(f"model folder {path} does not exist")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked but no CUDA device is available")
    if resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {device!r} is not supported; use auto, cpu or cuda[:N]")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(model, "generation_config", None), model.config.get_text_config(), model.config]
    for source in sources:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(item) for item in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _context_length(config: Any, tokenizer: Any) -> int:
    text_config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**8:
        return limit
    raise UnsupportedModelError("the model config states no context length (max_position_embeddings)")


def _read_config(auto_config: Any, folder: Path, common: dict[str, Any]) -> Any:
    """The model's config, from config.json or the GGUF file's metadata; a file transformers cannot
    read is a ModelLoadError, an architecture it does not know an UnsupportedModelError."""
    gguf_file = common.get("gguf_file")
    if gguf_file is None and not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} has no config.json; pass a transformers model folder (or a folder and its GGUF file)"
        )
    try:
        return auto_config.from_pretrained(folder, **common)
    except Exception as error:  # struct.error, ValueError, OSError, KeyError, ... from the readers
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'}"
        if gguf_file is not None:
            raise ModelLoadError(f"GGUF file {gguf_file} in {folder} could not be read ({reason})") from error
        if isinstance(error, ValueError):
            raise UnsupportedModelError(
                f"the config in {folder} names a model transformers cannot build ({reason})"
            ) from error
        raise ModelLoadError(f"the config in {folder} could not be read ({reason})") from error


def _load_processor(folder: Path, common: dict[str, Any]) -> Any:
    """The image processor of a vision model. Some need packages the server does not install
    (SmolVLM's needs torchvision and num2words): that is a ModelLoadError naming the package."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder, **common)
    except ImportError as error:
        details = " ".join(str(error).split())
        raise ModelLoadError(
            f"{folder.name} takes images, but its processor needs a package that is not installed: {details}"
        ) from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"the image processor of {folder.name} could not be loaded ({type(error).__name__}: {error})"
        ) from error


def load_model(options: LoadOptions) -> LoadedModel:
    """Load weights, tokenizer and (for vision models) processor. Raises ModelLoadError for bad
    options or a missing folder, UnsupportedModelError for architectures the engine cannot drive."""
    from protoserve.server.engine.model_runner import check_supported
    from protoserve.server.engine.multimodal import supports_images
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    folder = resolve_folder(options.path)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.quantization is not None and options.quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {options.quantization!r}; use 4bit or 8bit")
    if options.quantization is not None and options.gguf_file is not None:
        raise ModelLoadError("a GGUF file is already quantized; drop the quantization option")
    common: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
    if options.gguf_file is not None:
        if not (folder / options.gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {options.gguf_file} not found in {folder}")
        common["gguf_file"] = options.gguf_file
    config = _read_config(AutoConfig, folder, common)
    if getattr(config, "model_type", "") in SPEECH_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{config.model_type} is a speech model; it is served by the transcription service, not the engine"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{config.model_type} is an encoder-decoder model; the engine serves decoder-only models"
        )

    load_kwargs: dict[str, Any] = {**common, "dtype": dtype}
    quantization = "gguf" if options.gguf_file is not None else "none"
    if options.quantization is not None:
        from transformers import BitsAndBytesConfig

        if options.quantization == "4bit":
            load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        else:
            load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        quantization = QUANTIZATIONS[options.quantization]
    is_vision = hasattr(config, "vision_config")
    model_class = AutoModelForImageTextToText if is_vision else AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(folder, **load_kwargs)
    except Exception as error:
        if options.gguf_file is not None:  # a header that reads but tensors that do not, an unknown tensor type
            raise ModelLoadError(
                f"the weights of GGUF file {options.gguf_file} could not be loaded ({type(error).__name__}: {error})"
            ) from error
        if isinstance(error, ValueError):  # "Unrecognized configuration class ..." for unknown architectures
            raise UnsupportedModelError(f"cannot load {folder.name} as a generative model: {error}") from error
        raise
    if options.quantization is None:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    check_supported(model)

    tokenizer = AutoTokenizer.from_pretrained(folder, **common)
    processor = None
    modalities: tuple[str, ...] = ("text",)
    if supports_images(model):
        processor = _load_processor(folder, common)
        modalities = ("text", "image")
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        model_id=folder.name,
        architecture=architectures[0],
        dtype=str(dtype).removeprefix("torch."),
        device=str(next(model.parameters()).device),
        quantization=quantization,
        modalities=modalities,
        context_length=_context_length(config, tokenizer),
        eos_token_ids=_eos_token_ids(model, tokenizer),
        created=int(os.stat(folder).st_mtime),
    )


def loaded_from_model(model: Any, tokenizer: Any, model_id: str = "in-memory", processor: Any = None) -> LoadedModel:
    """Wrap a model already in memory (tests, benchmarks) as a LoadedModel."""
    from protoserve.server.engine.multimodal import supports_images

    model.eval()
    parameter = next(model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        model_id=model_id,
        architecture=type(model).__name__,
        dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device),
        quantization="none",
        modalities=("text", "image") if supports_images(model) else ("text",),
        context_length=_context_length(model.config, tokenizer),
        eos_token_ids=_eos_token_ids(model, tokenizer),
        created=int(time.time()),
    )
