"""Load a model folder (or a hub-cache entry) into a `LoadedModel` the engine can drive.

Local folders only, plus the local hub cache (`HF_HUB_OFFLINE` is respected: nothing is
downloaded). dtype "auto" is float32 on CPU (faster than bfloat16 on CPUs without AMX) and
bfloat16 on CUDA. Speech models are loaded by the transcription module, not here.

A folder that cannot be loaded (unreadable or truncated weights, missing tensors, no tokenizer) is
always a ModelLoadError naming the reason, never a bare exception from transformers.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

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
MISSING_WEIGHTS_NAMED = 5  # how many missing tensors a load error names
REASON_CHARS = 300  # how much of a library's error message a load error quotes

logger = logging.getLogger(__name__)


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


def describe_load_error(error: BaseException) -> str:
    """`Type: message` on one line and cut short, for load errors (transformers' messages run to many lines)."""
    message = " ".join(str(error).split()) or "no details"
    if len(message) > REASON_CHARS:
        message = message[: REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {message}"


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
        reason = describe_load_error(error)
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
    except Exception as error:  # OSError, ValueError, KeyError, TypeError, ... from the processor files
        logger.warning("the image processor in %s could not be loaded", folder, exc_info=True)
        raise ModelLoadError(
            f"the image processor of {folder.name} could not be loaded ({describe_load_error(error)})"
        ) from error


def missing_weights(model: Any, loading_info: dict[str, Any]) -> list[str]:
    """The model's parameters that the checkpoint did not hold, sorted: from_pretrained left them
    randomly initialised. Not counted: tied parameters (lm_head.weight under tie_word_embeddings,
    filled from the embeddings), keys the model declares optional (_keys_to_ignore_on_load_missing)
    and buffers (transformers computes them). Unexpected keys, extra tensors in the checkpoint,
    are never counted: many checkpoints carry old buffers."""
    reported = set(loading_info.get("missing_keys") or ())
    if not reported:
        return []
    parameters = {name for name, _ in model.named_parameters()}  # a tied parameter appears once, as its source
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    patterns = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    optional = re.compile("|".join(f"(?:{pattern})" for pattern in patterns)) if patterns else None
    return sorted(
        key
        for key in reported
        if key in parameters and key not in tied and (optional is None or optional.search(key) is None)
    )


def check_weights_complete(model: Any, loading_info: dict[str, Any], folder: Path) -> None:
    """Raise ModelLoadError when the checkpoint left parameters random (`loading_info` is what
    from_pretrained(..., output_loading_info=True) returned). Every loading path reports it in
    transformers 5 (safetensors and .bin folders, GGUF files, bitsandbytes 4/8-bit), so all are checked."""
    missing = missing_weights(model, loading_info)
    if not missing:
        return
    named = ", ".join(missing[:MISSING_WEIGHTS_NAMED]) + (", ..." if len(missing) > MISSING_WEIGHTS_NAMED else "")
    raise ModelLoadError(
        f"the weights in {folder} do not match its config: {len(missing)} of the model's tensors are missing "
        f"from the checkpoint ({named}); the files are incomplete or belong to another model"
    )


def load_model(options: LoadOptions) -> LoadedModel:
    """Load weights, tokenizer and (for vision models) processor. Raises ModelLoadError for bad
    options, a missing folder, files that cannot be loaded and weights that leave tensors of the
    model random; UnsupportedModelError for architectures the engine cannot drive."""
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
    model_type = getattr(config, "model_type", "")
    if model_type == "whisper":
        raise UnsupportedModelError(
            "whisper is a speech model; it is served by the transcription service, not the engine"
        )
    if model_type in SPEECH_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{model_type} is a speech model, and the only speech models served are whisper models; "
            "the engine serves text and vision-language models"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{config.model_type} is an encoder-decoder model; the engine serves decoder-only models"
        )

    load_kwargs: dict[str, Any] = {**common, "dtype": dtype}
    quantization = "gguf" if options.gguf_file is not None else "none"
    if options.quantization is not None:
        from transformers import BitsAndBytesConfig

        # A quantized model cannot be moved after loading: bitsandbytes places it as it loads, and
        # without a device_map it picks cuda:0 whenever CUDA is available, whatever --device says.
        load_kwargs["device_map"] = {"": str(device)}
        if options.quantization == "4bit":
            load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        else:
            load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        quantization = QUANTIZATIONS[options.quantization]
    is_vision = hasattr(config, "vision_config")
    model_class = AutoModelForImageTextToText if is_vision else AutoModelForCausalLM
    try:
        model, loading_info = cast(
            tuple[Any, dict[str, Any]], model_class.from_pretrained(folder, output_loading_info=True, **load_kwargs)
        )
    except Exception as error:  # SafetensorError, OSError (no or missing weight files), RuntimeError (shapes), ...
        # Broken files are the usual cause, but keep a bug of ours visible in the server log.
        logger.warning("the weights in %s could not be loaded", folder, exc_info=True)
        if options.gguf_file is not None:  # a header that reads but tensors that do not, an unknown tensor type
            raise ModelLoadError(
                f"the weights of GGUF file {options.gguf_file} could not be loaded ({describe_load_error(error)})"
            ) from error
        if isinstance(error, ValueError) and "Unrecognized configuration class" in str(error):
            raise UnsupportedModelError(f"cannot load {folder.name} as a generative model: {error}") from error
        hint = ""
        if "ignore_mismatched_sizes" in str(error):  # transformers' report of the shapes went to the server log
            hint = "; the shapes of its tensors do not fit config.json (the server log lists them)"
        raise ModelLoadError(
            f"the weights in {folder} could not be loaded ({describe_load_error(error)}){hint}"
        ) from error
    check_weights_complete(model, loading_info, folder)
    if options.quantization is None:
        model.to(device)
    model.eval()
    check_supported(model)

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
    except Exception as error:  # no tokenizer files (ValueError), unreadable ones (OSError, JSON errors), ...
        logger.warning("the tokenizer in %s could not be loaded", folder, exc_info=True)
        raise ModelLoadError(
            f"the tokenizer in {folder} could not be loaded ({describe_load_error(error)}); a model folder needs its "
            "tokenizer files (tokenizer.json or the model's vocabulary files, and tokenizer_config.json)"
        ) from error
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
