"""Images through the engine: a tiny random LLaVA gives the same greedy tokens as `generate`, and the
prefix cache never matches blocks of one image against another."""

from __future__ import annotations

import copy

import pytest
import torch
from protoserve.server.engine.api import EngineConfig, EngineRequest, MultimodalInputs
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.engine.loader import loaded_from_model
from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from .engine_fixtures import EOS_TOKEN_ID, build_model, greedy, run_until_done, tiny_llama_config, word_tokenizer

IMAGE_TOKEN_ID = EOS_TOKEN_ID - 1
IMAGE_TOKENS = 4  # 16 px images, 8 px patches


@pytest.fixture(scope="module")
def llava() -> LlavaForConditionalGeneration:
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=IMAGE_TOKENS,
    )
    return build_model(config, LlavaForConditionalGeneration)


def image(seed: int) -> MultimodalInputs:
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return MultimodalInputs({"pixel_values": pixels}, (f"image-{seed}",))


def reference(
    model: LlavaForConditionalGeneration, prompt: list[int], inputs: MultimodalInputs, tokens: int
) -> list[int]:
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=inputs.tensors["pixel_values"],
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=0,
        )
    return generated[0, len(prompt) :].tolist()


def make_engine(model: LlavaForConditionalGeneration, **config: object) -> LLMEngine:
    settings: dict[str, object] = {"kv_cache_bytes": 1 << 20, "block_size": 4}
    settings.update(config)
    return LLMEngine(loaded_from_model(copy.deepcopy(model), word_tokenizer()), EngineConfig(**settings))


PROMPT = [5, 6, 7, 8, 9, 10, 11, 12] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS + [20, 21, 22, 23, 24, 25, 26]


def test_llava_matches_generate_with_chunked_prefill(llava) -> None:
    engine = make_engine(llava, max_num_batched_tokens=5)
    assert engine.loaded.modalities == ("text", "image")
    engine.add_request(EngineRequest("one", tuple(PROMPT), greedy(8), multimodal=image(1)))
    engine.add_request(EngineRequest("two", tuple(PROMPT), greedy(8), multimodal=image(2)))
    engine.add_request(EngineRequest("text", (5, 6, 7), greedy(8)))
    results = run_until_done(engine)
    assert results["one"].token_ids[0] == reference(llava, PROMPT, image(1), 8)
    assert results["two"].token_ids[0] == reference(llava, PROMPT, image(2), 8)
    assert results["one"].token_ids[0] != results["two"].token_ids[0]
    assert engine.stats().kv_blocks_used == 0


def test_prefix_cache_never_matches_across_images(llava) -> None:
    engine = make_engine(llava)
    engine.add_request(EngineRequest("first", tuple(PROMPT), greedy(4), multimodal=image(1)))
    run_until_done(engine)
    engine.add_request(EngineRequest("other-image", tuple(PROMPT), greedy(4), multimodal=image(2)))
    other = run_until_done(engine)["other-image"]
    engine.add_request(EngineRequest("same-image", tuple(PROMPT), greedy(4), multimodal=image(1)))
    same = run_until_done(engine)["same-image"]
    # Blocks 0-1 hold text only; blocks 2-3 hold image tokens; block 4 holds the last prompt token.
    assert other.usage.cached_tokens == 8
    assert other.token_ids[0] == reference(llava, PROMPT, image(2), 4)
    assert same.usage.cached_tokens == 16
    assert same.token_ids[0] == reference(llava, PROMPT, image(1), 4)


def test_placeholder_count_must_match_the_images(llava) -> None:
    engine = make_engine(llava)
    wrong = [5, 6] + [IMAGE_TOKEN_ID] * (IMAGE_TOKENS - 1) + [7]
    with pytest.raises(InvalidRequestError, match="3 image placeholder tokens"):
        engine.add_request(EngineRequest("wrong", tuple(wrong), greedy(4), multimodal=image(1)))
    assert not engine.has_unfinished_requests


def test_malformed_image_tensors_are_a_bad_request(llava) -> None:
    engine = make_engine(llava)
    missing = MultimodalInputs({"pixel_attention_mask": torch.ones(1, 16, 16)}, ("nothing",))
    with pytest.raises(InvalidRequestError, match="could not be encoded"):
        engine.add_request(EngineRequest("missing", tuple(PROMPT), greedy(4), multimodal=missing))
    wrong_size = MultimodalInputs({"pixel_values": torch.zeros(1, 3, 5, 7)}, ("small",))
    with pytest.raises(InvalidRequestError):
        engine.add_request(EngineRequest("wrong-size", tuple(PROMPT), greedy(4), multimodal=wrong_size))
    assert not engine.has_unfinished_requests
