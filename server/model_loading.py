"""Reading weights into served models, describing them, and warming them up.

Language and vision-language models go through the engine's loader and get an `AsyncEngine`;
whisper folders (config.json `model_type == "whisper"`) go through the transcription loader.
Only local files are read: a folder, or a hub id already in the local hub cache. Nothing is ever
downloaded because a client asked for a model. Weight loading runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import traceback
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.engine.api import EngineRequest, SamplingParams
from protoserve.server.engine.errors import ModelLoadError
from protoserve.server.registry import ModelDescription, ServedGenerationModel, ServedModel, ServedSpeechModel

logger = logging.getLogger("protoserve.server.model_loading")

WARM_UP_PROMPT = "Hello"

T = TypeVar("T")


async def run_in_daemon_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking `function` in a daemon thread and await its result.

    Unlike `asyncio.to_thread`, a load still running when the server is told to stop does not keep
    the process alive: daemon threads are not joined at exit, so a SIGTERM during a 40-second load
    ends the process at once.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: T | None = None
        failure: BaseException | None = None
        try:
            result = function(*args, **kwargs)
        except BaseException as error:  # delivered to the awaiting coroutine
            # The traceback keeps the failed load's frames, and with them a half-loaded model (GPU
            # memory too) until the exception is dropped and a garbage collection runs: drop their locals.
            traceback.clear_frames(error.__traceback__)
            failure = error
        try:
            loop.call_soon_threadsafe(deliver, result, failure)
        except RuntimeError:  # the loop closed while loading: nobody waits any more
            pass

    threading.Thread(target=work, name=f"protoserve-load-{getattr(function, '__name__', 'model')}", daemon=True).start()
    return await future


def _owner(model_id: str) -> str:
    """"org" for hub ids like "org/name"; "protoserve" for local folders."""
    if model_id.count("/") == 1 and not model_id.startswith((".", "/", "~")):
        return model_id.split("/", 1)[0]
    return "protoserve"


def _cached_hub_folder(model_id: str) -> Path | None:
    """The local hub-cache snapshot of `model_id`, or None. Never touches the network."""
    if model_id.count("/") != 1 or model_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # invalid repo ids raise; they are simply not in the cache
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def resolve_model_folder(path: str) -> Path | None:
    """A local folder, or the local hub-cache snapshot of a hub id; None when neither exists."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    return _cached_hub_folder(path)


def is_whisper_folder(folder: Path) -> bool:
    """True when the folder's config.json says `model_type: whisper`."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "whisper"


def describe_generation_model(model_id: str, loaded: Any) -> ModelDescription:
    """The description of a loaded language model (`LoadedModel` from the engine's loader)."""
    chat_template = getattr(loaded.tokenizer, "chat_template", None) or getattr(
        loaded.processor, "chat_template", None
    )
    return ModelDescription(
        id=model_id,
        owned_by=_owner(model_id),
        created=int(loaded.created),
        modalities=tuple(loaded.modalities),
        context_length=int(loaded.context_length),
        quantization=str(loaded.quantization),
        loaded=True,
        architecture=str(loaded.architecture),
        dtype=str(loaded.dtype),
        device=str(loaded.device),
        capabilities=("generate", "chat") if chat_template else ("generate",),
    )


def describe_speech_model(model_id: str, speech: Any) -> ModelDescription:
    """The description of a loaded speech model (`SpeechModel` from the transcription loader)."""
    return ModelDescription(
        id=model_id,
        owned_by=_owner(model_id),
        created=int(speech.created),
        modalities=("audio",),
        context_length=int(speech.context_length),
        quantization="none",
        loaded=True,
        architecture=str(speech.architecture),
        dtype=str(speech.dtype),
        device=str(speech.device),
        capabilities=("transcribe",),
    )


class TransformersModelLoader:
    """The registry's loader for real weights, configured by the server's flags."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config

    def resolve(self, model_id: str) -> ModelSpec | None:
        folder = resolve_model_folder(model_id)
        return ModelSpec(model_id, str(folder)) if folder is not None else None

    async def load(self, spec: ModelSpec) -> ServedModel:
        folder = resolve_model_folder(spec.path)
        if folder is None:
            raise ModelLoadError(
                f"model {spec.model_id!r}: {spec.path!r} is not a folder here, nor a hub id in the local hub cache"
            )
        if is_whisper_folder(folder):
            return await self._load_speech(spec, folder)
        return await self._load_generation(spec, folder)

    async def _load_speech(self, spec: ModelSpec, folder: Path) -> ServedSpeechModel:
        """Whisper runs in --dtype on --device. --gguf-file names this one model's file, so a whisper
        folder with it is refused; --quantization is server-wide (`--quantization 8bit --model chat
        --model whisper` is a valid setup), so it is not applied to speech models: a warning says so,
        and the description reports quantization "none"."""
        from protoserve.server.transcription.speech_model import load_speech_model

        model_id = spec.model_id
        if spec.gguf_file is not None:
            raise ModelLoadError(
                f"model {model_id!r}: {folder} is a whisper model, which is loaded from its transformers "
                f"files; --gguf-file {spec.gguf_file} applies only to language models"
            )
        if self._config.quantization != "none":
            logger.warning(
                "model %s is a whisper speech model: --quantization %s applies only to language models, "
                "so it is loaded unquantized (dtype %s)",
                model_id,
                self._config.quantization,
                self._config.dtype,
            )
        speech = await run_in_daemon_thread(
            load_speech_model, str(folder), dtype=self._config.dtype, device=self._config.device
        )
        return ServedSpeechModel(describe_speech_model(model_id, speech), speech)

    async def _load_generation(self, spec: ModelSpec, folder: Path) -> ServedGenerationModel:
        from protoserve.server.engine.async_engine import AsyncEngine
        from protoserve.server.engine.loader import LoadOptions, load_model

        options = LoadOptions(
            path=str(folder),
            dtype=self._config.dtype,
            device=self._config.device,
            quantization=None if self._config.quantization == "none" else self._config.quantization,
            gguf_file=spec.gguf_file,
            trust_remote_code=self._config.trust_remote_code,
        )
        loaded = await run_in_daemon_thread(load_model, options)
        if self._config.engine.cpu_kernels and str(loaded.device).startswith("cpu"):
            from protoserve.server.engine.cpu_kernels import cpu_kernels

            # The first build on a machine compiles C++ for ~30 s: in a loading thread, never on
            # the event loop (the engine below then finds the kernels built).
            await run_in_daemon_thread(cpu_kernels)
        engine = AsyncEngine(loaded, self._config.engine)
        return ServedGenerationModel(describe_generation_model(spec.model_id, loaded), loaded, engine)


def _warm_up_prompt_ids(loaded: Any) -> tuple[int, ...]:
    tokenizer = getattr(loaded, "tokenizer", None)
    ids: list[int] = []
    if tokenizer is not None:
        ids = list(tokenizer.encode(WARM_UP_PROMPT))[:8]
    if not ids:
        ids = [min(getattr(loaded, "eos_token_ids", None) or {0})]
    return tuple(int(token_id) for token_id in ids)


def silent_wav(seconds: float = 0.5, sample_rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV file of silence, to warm up speech models."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(b"\x00\x00" * int(seconds * sample_rate))
    return buffer.getvalue()


async def warm_up(served: ServedModel) -> None:
    """Run one tiny request through the model, so the first real request pays no first-call costs
    and a model that cannot answer fails at startup, before health says SERVING."""
    model_id = served.description.id
    if isinstance(served, ServedGenerationModel):
        request = EngineRequest(
            request_id=f"warm-up-{model_id}",
            prompt_token_ids=_warm_up_prompt_ids(served.loaded),
            params=SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
        )
        async for _ in served.engine.generate(request):
            pass
    else:
        from protoserve.server.transcription.contract import TranscribeOptions

        options = TranscribeOptions(task="transcribe", max_seconds=1.0)
        async for _ in served.model.transcribe(silent_wav(), options):
            pass
    logger.info("warmed up model %s", model_id)
