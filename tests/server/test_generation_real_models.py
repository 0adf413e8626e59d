"""Chat with the real demo models through the servicer and the real engine: the SmolLM2 chat model's own
template and tokenizer, and the tiny LLaVA model's processor with an image."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest
from PIL import Image
from protoserve.server.engine.api import EngineConfig
from protoserve.server.registry import ModelRegistry, ServedGenerationModel
from protoserve.server.services.generation import GenerationServicer
from protoserve.v1 import common_pb2, generation_pb2_grpc
from protoserve.v1 import generation_pb2 as pb

try:
    from .generation_fakes import server_config
except ImportError:
    from generation_fakes import server_config  # type: ignore[no-redef]


def demo_folder(request: pytest.FixtureRequest, kind: str) -> Path:
    try:
        demo_models = request.getfixturevalue("demo_models")
    except Exception as error:  # fetching the demo models is another part's job; skip only these tests
        pytest.skip(f"the demo models are not available ({type(error).__name__}: {error})")
    return Path(getattr(demo_models, kind))


async def serve(folder: Path, model_id: str) -> AsyncIterator[generation_pb2_grpc.GenerationServiceStub]:
    from protoserve.server.engine.async_engine import AsyncEngine
    from protoserve.server.engine.loader import LoadOptions, load_model
    from protoserve.server.model_loading import describe_generation_model

    loaded = load_model(LoadOptions(str(folder), device="cpu"))
    engine = AsyncEngine(loaded, EngineConfig(kv_cache_bytes=64 << 20, max_num_batched_tokens=512))
    served = ServedGenerationModel(describe_generation_model(model_id, loaded), loaded, engine)
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(ModelRegistry([served]), server_config(), None), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield generation_pb2_grpc.GenerationServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)
        await engine.shutdown()


@pytest.fixture
async def chat_stub(request: pytest.FixtureRequest) -> AsyncIterator[generation_pb2_grpc.GenerationServiceStub]:
    async for stub in serve(demo_folder(request, "chat"), "smollm2"):
        yield stub


@pytest.fixture
async def vision_stub(request: pytest.FixtureRequest) -> AsyncIterator[generation_pb2_grpc.GenerationServiceStub]:
    async for stub in serve(demo_folder(request, "vision"), "tiny-llava"):
        yield stub


def user(*parts: pb.ContentPart) -> pb.ChatMessage:
    return pb.ChatMessage(role="user", content=list(parts))


async def test_smollm2_answers_through_chat(chat_stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    request = pb.ChatRequest(
        messages=[user(pb.ContentPart(text="What is the capital of France?"))],
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=12),
    )
    chunks = [chunk async for chunk in chat_stub.Chat(request, timeout=120)]
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text.startswith("The capital of France is Paris.")
    assert chunks[-1].usage.completion_tokens <= 12 and chunks[-1].choices[-1].finish_reason != 0


async def test_tiny_llava_takes_an_image(vision_stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "green").save(buffer, format="PNG")
    image = pb.Image(url="data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    message = user(pb.ContentPart(text="What is in this picture?"), pb.ContentPart(image=image))
    request = pb.ChatRequest(messages=[message], sampling=common_pb2.SamplingParams(temperature=0, max_tokens=5))
    result = await vision_stub.ChatUnary(request, timeout=120)
    tokenized = await vision_stub.Tokenize(pb.TokenizeRequest(messages=pb.ChatMessages(messages=[message])))
    assert result.usage.completion_tokens == len(result.choices[0].token_ids) <= 5
    assert result.usage.prompt_tokens == len(tokenized.token_ids) > (224 // 16) ** 2  # 196 image tokens plus text
    text_only = await vision_stub.Tokenize(
        pb.TokenizeRequest(messages=pb.ChatMessages(messages=[user(pb.ContentPart(text="What is in this picture?"))]))
    )
    assert len(tokenized.token_ids) - len(text_only.token_ids) >= (224 // 16) ** 2
