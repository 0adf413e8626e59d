"""A loaded whisper model that transcribes audio files into a stream of segments.

Long audio is decoded sequentially, one 30-second window at a time, as whisper itself does: each
window is decoded with timestamps; when its last segment was cut off mid-speech the next window
starts at that segment's end, otherwise right after the window. Every window gets the caller's
prompt as previous text (`<|startofprev|>` prompt tokens); the text of earlier windows is not fed
back, since with greedy decoding that makes whisper repeat itself on repetitive speech. Each
window's segments are yielded as soon as it is decoded.

Each window is decoded with temperature fallback and silence detection (`whisper_fallback`): a
decode that looks stuck is retried hotter, and a window judged silent gives no segment and is
skipped whole. Sampling draws from one `torch.Generator` per request, seeded from a SHA-256 of the
audio bytes and the options (`request_seed`), so the same request always gives the same
transcript, while different audio or options sample differently.

Model work runs in a worker thread, one window at a time per model (a lock), never on the event
loop. A consumer that stops iterating stops the transcription after the window in progress.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from protoserve.server.engine import compute_threads
from protoserve.server.engine.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from protoserve.server.transcription.audio import SAMPLE_RATE, AudioClip, decode_audio
from protoserve.server.transcription.contract import (
    DoneEvent,
    Segment,
    SegmentEvent,
    TranscribeOptions,
    TranscriptionEvent,
)
from protoserve.server.transcription.whisper_decoding import DecodedWindow, decode_window, split_segments
from protoserve.server.transcription.whisper_fallback import FallbackPolicy, decode_with_fallback
from protoserve.server.transcription.whisper_tokens import WhisperTokens, whisper_tokens
from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

WINDOW_SECONDS = 30.0
MIN_WINDOW_SECONDS = 0.1  # a tail shorter than this is not decoded
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

logger = logging.getLogger(__name__)


def request_seed(audio: bytes, options: TranscribeOptions) -> int:
    """The sampling seed of a request: a hash of its audio bytes and options (every field)."""
    digest = hashlib.sha256()
    digest.update(len(audio).to_bytes(8, "little"))
    digest.update(audio)
    digest.update(repr(options).encode("utf-8"))
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


@dataclass
class _Progress:
    """What one transcription carries from window to window."""

    prompt_ids: list[int]
    next_segment_id: int = 0


class SpeechModel:
    """A whisper model with its feature extractor and tokenizer. Safe to share between requests."""

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        feature_extractor: WhisperFeatureExtractor,
        tokenizer: Any,
        model_id: str,
    ) -> None:
        self.model = model
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.architecture = (model.config.architectures or [type(model).__name__])[0]
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.device = str(model.device)
        self.created = int(time.time())
        self.context_length = int(model.config.max_target_positions)
        declared = getattr(model.generation_config, "is_multilingual", None)
        self.multilingual = bool(declared) if declared is not None else model.config.vocab_size >= 51865
        self.tokens: WhisperTokens = whisper_tokens(tokenizer, self.multilingual)
        vocab_size = int(model.config.vocab_size)
        suppressed = getattr(model.generation_config, "suppress_tokens", None) or ()
        self.suppressed_tokens = tuple(int(token) for token in suppressed if 0 <= int(token) < vocab_size)
        self._lock = threading.Lock()
        # Windows are decoded one at a time (the lock) on one long-lived compute thread, so the
        # process holds one OpenMP pool for speech, not one per executor thread (compute_threads).
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"protoserve-speech-{model_id}", initializer=compute_threads.enter
        )

    def close(self) -> None:
        """Stop the decoding thread once its current window is done (the model is being unloaded)."""
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _check_options(self, options: TranscribeOptions) -> str:
        """Validate the options; return the language code, or "" when it must be detected."""
        if options.task not in ("transcribe", "translate"):
            raise InvalidRequestError(f"task must be 'transcribe' or 'translate', not {options.task!r}")
        if not 0.0 <= options.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be between 0 and 2, not {options.temperature}")
        if not isinstance(options.fallback, FallbackPolicy):
            raise InvalidRequestError(f"fallback must be a FallbackPolicy, not {type(options.fallback).__name__}")
        if not self.multilingual:
            if options.task == "translate":
                raise InvalidRequestError(
                    f"{self.model_id} is an English-only model and cannot translate; use a multilingual model"
                )
            if options.language and self.tokens.language_code(options.language) != "en":
                raise InvalidRequestError(
                    f"{self.model_id} is an English-only model; language must be 'en' or empty, "
                    f"not {options.language!r}"
                )
            return "en"
        return self.tokens.language_code(options.language) if options.language else ""

    def _features(self, samples: np.ndarray) -> torch.Tensor:
        features = self.feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        return features.to(device=self.model.device, dtype=self.model.dtype)

    def _detect_language(self, encoder_outputs: Any) -> str:
        with torch.inference_mode():
            start = torch.tensor([[self.tokens.start_of_transcript]], device=self.model.device)
            logits = self.model(encoder_outputs=encoder_outputs, decoder_input_ids=start).logits[0, -1]
        codes = list(self.tokens.language_ids)
        candidate_ids = torch.tensor([self.tokens.language_ids[code] for code in codes], device=logits.device)
        return codes[int(torch.argmax(logits[candidate_ids]).item())]

    def _decode_prefix(self, progress: _Progress, language: str, task: str) -> tuple[list[int], int]:
        """The decoder prompt for the next window, and how many new tokens still fit after it."""
        start = self.tokens.start_sequence(language, task)
        room_for_previous = self.context_length // 2 - 1
        previous = progress.prompt_ids[-room_for_previous:] if room_for_previous > 0 else []
        prefix = ([self.tokens.start_of_previous, *previous] if previous else []) + start
        return prefix, max(1, min(self.context_length // 2, self.context_length - len(prefix)))

    def _text_of(self, decoded: DecodedWindow) -> str:
        """A decode's text, timestamps and special tokens left out."""
        text_ids = [token for token in decoded.token_ids if self.tokens.is_text(token)]
        return str(self.tokenizer.decode(text_ids, skip_special_tokens=True))

    def _transcribe_window(
        self,
        clip: AudioClip,
        seek: int,
        language: str,
        options: TranscribeOptions,
        progress: _Progress,
        generator: torch.Generator,
    ) -> tuple[list[Segment], int, str]:
        """Decode the window starting at sample `seek`; return its segments, the next seek, the language."""
        with self._lock:
            window = clip.samples[seek : seek + int(WINDOW_SECONDS * SAMPLE_RATE)]
            window_s = window.size / SAMPLE_RATE
            with torch.inference_mode():
                encoder_outputs = self.model.get_encoder()(self._features(window))
            if not language:
                language = self._detect_language(encoder_outputs)
            prefix, max_new_tokens = self._decode_prefix(progress, language, options.task)

            def decode(temperature: float) -> DecodedWindow:
                return decode_window(
                    self.model,
                    encoder_outputs,
                    prefix,
                    self.tokens,
                    window_s=window_s,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    generator=generator,
                    suppressed_tokens=self.suppressed_tokens,
                )

            judged = decode_with_fallback(decode, self._text_of, options.fallback, options.temperature)
        if judged.is_silence:
            return [], seek + window.size, language
        window_segments, consumed_s = split_segments(judged.decoded, self.tokens, window_s)
        offset = seek / SAMPLE_RATE
        segments: list[Segment] = []
        for piece in window_segments:
            text_ids = [token for token in piece.token_ids if self.tokens.is_text(token)]
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            if not text.strip():
                continue
            segments.append(
                Segment(
                    id=progress.next_segment_id,
                    start=round(offset + piece.start, 3),
                    end=round(offset + piece.end, 3),
                    text=text,
                    token_ids=piece.token_ids,
                    avg_logprob=float(np.mean(piece.logprobs)) if piece.logprobs else 0.0,
                )
            )
            progress.next_segment_id += 1
        next_seek = seek + max(int(consumed_s * SAMPLE_RATE), 1)
        return segments, next_seek, language

    async def transcribe(self, audio: bytes, options: TranscribeOptions) -> AsyncIterator[TranscriptionEvent]:
        """Stream a `SegmentEvent` per window that held speech, then one `DoneEvent`.

        Raises InvalidRequestError (bad options, undecodable or too-long audio) before any event.
        """
        language = self._check_options(options)
        clip = await asyncio.to_thread(decode_audio, audio, filename=options.filename, max_seconds=options.max_seconds)
        prompt = options.prompt.strip()
        prompt_ids = self.tokenizer.encode(" " + prompt, add_special_tokens=False) if prompt else []
        progress = _Progress(prompt_ids=[int(token) for token in prompt_ids if self.tokens.is_text(int(token))])
        generator = torch.Generator()
        generator.manual_seed(request_seed(audio, options))
        texts: list[str] = []
        seek = 0
        while clip.samples.size - seek >= MIN_WINDOW_SECONDS * SAMPLE_RATE:
            window = functools.partial(self._transcribe_window, clip, seek, language, options, progress, generator)
            segments, seek, language = await asyncio.get_running_loop().run_in_executor(self._worker, window)
            if segments:
                texts.extend(segment.text for segment in segments)
                yield SegmentEvent(segments=tuple(segments))
        yield DoneEvent(text="".join(texts).strip(), language=language or "en", duration=round(clip.duration, 3))


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but no CUDA device is available")
    return resolved


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_speech_model(
    path: str | Path, *, dtype: str = "auto", device: str = "auto", model_id: str | None = None
) -> SpeechModel:
    """Load a transformers whisper folder (model, feature extractor and tokenizer files).

    Raises FileNotFoundError for a missing folder, UnsupportedModelError for a folder that is not a
    whisper model, ValueError for an unknown dtype or device, and ModelLoadError naming the reason
    for files that cannot be loaded (truncated or missing weights, weights missing tensors, no
    tokenizer or feature extractor files).
    """
    from protoserve.server.engine.loader import check_weights_complete, describe_load_error

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model folder with a config.json at {folder}")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "whisper":
        raise UnsupportedModelError(f"{folder} holds a {model_type!r} model; speech models must be whisper")
    resolved_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, resolved_device)
    part = "weights"
    try:
        model, loading_info = cast(
            tuple[WhisperForConditionalGeneration, dict[str, Any]],
            WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype, output_loading_info=True),
        )
        part = "feature extractor"
        feature_extractor = WhisperFeatureExtractor.from_pretrained(folder)
        part = "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # SafetensorError, OSError, ValueError, RuntimeError (shapes), ...
        # Broken files are the usual cause, but keep a bug of ours visible in the server log.
        logger.warning("the %s of the whisper model in %s could not be loaded", part, folder, exc_info=True)
        raise ModelLoadError(
            f"the {part} of the whisper model in {folder} could not be loaded ({describe_load_error(error)})"
        ) from error
    check_weights_complete(model, loading_info, folder)
    torch.nn.Module.to(model, resolved_device)
    model.eval()
    return SpeechModel(model, feature_extractor, tokenizer, model_id or folder.name)
