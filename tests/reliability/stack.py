"""Real servers for the reliability suite: a tiny random chat model saved as a model folder, and an
in-process server plus translator on loopback (for tests that need the engine's hooks and stats).

The tiny model is a random Llama with a word-level tokenizer (tokens "w0".."w{n}" and "<eos>") and
a chat template that joins the messages' text and appends the template variable `extra` when
given. Weights are drawn wider than the default init so greedy choices are not near-ties.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protoserve.server.app import RunningServer, start_server
from protoserve.server.config import ModelSpec, ServerConfig
from protoserve.server.engine.api import EngineConfig, EngineStats
from protoserve.translator.config import TranslatorConfig
from protoserve.translator.server import RunningTranslator, start_translator

TINY_VOCAB_SIZE = 512
TINY_EOS_TOKEN = "<eos>"
TINY_MODEL_ID = "tiny"
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }} {% endfor %}{% if extra is defined %}{{ extra }}{% endif %}"
)


def build_tiny_chat_model(folder: Path, context_length: int = 2048, seed: int = 0) -> Path:
    """Save a tiny random Llama, its tokenizer and chat template into `folder`; returns `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    eos_id = TINY_VOCAB_SIZE - 1
    vocab = {f"w{i}": i for i in range(eos_id)} | {TINY_EOS_TOKEN: eos_id}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS_TOKEN, unk_token="w0")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        eos_token_id=eos_id,
        pad_token_id=0,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


def tiny_prompt(index: int, length: int = 6) -> str:
    """A distinct prompt of `length` words for request `index`."""
    return " ".join(f"w{(index * 7 + position * 13) % (TINY_VOCAB_SIZE - 2) + 1}" for position in range(length))


@dataclass
class InProcessStack:
    """A server and a translator running in the test's event loop."""

    server: RunningServer
    translator: RunningTranslator
    model_id: str

    @property
    def base_url(self) -> str:
        return f"{self.translator.url}/v1"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.ports[0]}"

    async def engine(self) -> Any:
        """The model's AsyncEngine (for `inject_step_fault` and stats)."""
        served = await self.server.registry.generation_model(self.model_id)
        return served.engine

    def stats(self) -> EngineStats:
        return self.server.registry.engine_stats()[self.model_id]


@asynccontextmanager
async def in_process_stack(
    model_folder: Path,
    engine: EngineConfig | None = None,
    translator: TranslatorConfig | None = None,
    model_id: str = TINY_MODEL_ID,
    **server_options: Any,
) -> AsyncIterator[InProcessStack]:
    """Start a server (one model, CPU, any free port) and a translator in front of it; drain both after."""
    config = ServerConfig(
        models=(ModelSpec(model_id, str(model_folder)),),
        port=0,
        device="cpu",
        engine=engine or EngineConfig(kv_cache_bytes=8 << 20, block_size=16),
        **server_options,
    )
    server = await start_server(config)
    translator_config = dataclasses.replace(translator or TranslatorConfig(), upstream=f"127.0.0.1:{server.ports[0]}")
    try:
        running_translator = await start_translator(translator_config)
    except BaseException:
        await server.drain(1.0)
        raise
    try:
        yield InProcessStack(server, running_translator, model_id)
    finally:
        await running_translator.stop()
        await server.drain(5.0)


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `condition` every 20 ms; returns the seconds it took, or fails naming `what`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started
