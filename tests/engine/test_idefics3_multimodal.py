"""Idefics3/SmolVLM-family images through the engine: a tiny random Idefics3 saved to a folder, loaded by
the engine's loader (the PIL image processor, no torchvision), chats with images split into tiles plus
a global image, and greedy tokens equal to `generate`; the same for a tiny SmolVLM. A processor needing
packages the server lacks, and Qwen2-VL (3-D rotary positions), are refused at load time with a clear error."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from protoserve.server.chat.images import TEXT_ONLY_KEYS, ProcessedPrompt, processed_prompt, with_images
from protoserve.server.engine.api import EngineConfig, EngineRequest, MultimodalInputs
from protoserve.server.engine.engine import LLMEngine
from protoserve.server.engine.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from protoserve.server.engine.loader import LoadedModel, LoadOptions, load_model, loaded_from_model
from protoserve.server.limits import RequestLimits
from protoserve.server.media.images import LoadedImage
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

from .engine_fixtures import build_model, greedy, run_until_done

IMAGE_TOKENS_PER_TILE = 4  # 32 px tiles, 8 px patches (16 patches), pixel shuffle by 2
SPECIAL_TOKENS = [
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{row}_col_{column}>" for row in range(1, 7) for column in range(1, 7)),
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %} {% endfor %}"
    "<end_of_utterance> {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def tokenizer() -> PreTrainedTokenizerFast:
    """Words "w0".."w199", the two role words, "<eos>" and Idefics3's image tokens."""
    words = [f"w{index}" for index in range(200)] + ["user:", "assistant:", "<eos>"] + SPECIAL_TOKENS
    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(words)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", additional_special_tokens=SPECIAL_TOKENS
    )


def processor() -> Idefics3Processor:
    # Images are resized to at most 64 px and cut into 32 px tiles, plus one 32 px global image.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer(),
        image_seq_len=IMAGE_TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_family_config(config_class: Any, vision_config_class: Any) -> Any:
    """A tiny Idefics3-family config (Idefics3Config or SmolVLMConfig): 32 px tiles of 8 px patches."""
    words = tokenizer()
    text = LlamaConfig(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=words.eos_token_id,
        pad_token_id=0,
        bos_token_id=None,
    )
    vision = vision_config_class(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    image_token_id = words.convert_tokens_to_ids("<image>")
    return config_class(text_config=text, vision_config=vision, image_token_id=image_token_id, scale_factor=2)


@pytest.fixture(scope="module")
def idefics3() -> Idefics3ForConditionalGeneration:
    config = tiny_family_config(Idefics3Config, Idefics3VisionConfig)
    return build_model(config, Idefics3ForConditionalGeneration)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def loaded(idefics3: Idefics3ForConditionalGeneration, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The model saved with its processor, then loaded by the engine's loader (a separate copy)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-idefics3"
    idefics3.save_pretrained(folder)
    processor().save_pretrained(folder)
    return load_model(LoadOptions(str(folder), device="cpu"))


def random_image(seed: int, height: int, width: int) -> LoadedImage:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    return LoadedImage(Image.fromarray(pixels), content_hash=f"image-{seed}")


def chat_messages(words: str, images: int = 1) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": words}]}]


def chat_with_image(processor: Any, image: LoadedImage | list[LoadedImage], words: str) -> ProcessedPrompt:
    """As the server's image path does (`server/chat/images.py`), but without `sanitize_control_tokens`:
    the processor renders the template, expands the image into tiles and makes the pixel tensors."""
    images = image if isinstance(image, list) else [image]
    outputs = processor.apply_chat_template(
        with_images(chat_messages(words, len(images)), images),
        chat_template=CHAT_TEMPLATE,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"add_special_tokens": False},
    )
    tensors = {name: value for name, value in outputs.items() if name not in TEXT_ONLY_KEYS}
    token_ids = outputs["input_ids"][0].tolist()
    hashes = tuple(one.content_hash for one in images)
    return ProcessedPrompt(token_ids, MultimodalInputs(tensors=tensors, content_hashes=hashes))


def reference(model: Any, prompt: ProcessedPrompt, tokens: int) -> list[int]:
    """Plain `generate` on an Idefics3 model for one prompt alone: the generated ids."""
    input_ids = torch.tensor([prompt.token_ids])
    with torch.no_grad():
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            **prompt.multimodal.tensors,
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=model.config.text_config.eos_token_id,
            pad_token_id=0,
        )
    return generated[0, len(prompt.token_ids) :].tolist()


def image_token_count(loaded: LoadedModel, prompt: ProcessedPrompt) -> int:
    return prompt.token_ids.count(loaded.model.config.image_token_id)


def test_the_loader_serves_idefics3_with_the_pil_processor(loaded: LoadedModel) -> None:
    assert loaded.architecture == "Idefics3ForConditionalGeneration"
    assert loaded.modalities == ("text", "image")
    assert isinstance(loaded.processor, Idefics3Processor)
    assert isinstance(loaded.processor.image_processor, Idefics3ImageProcessorPil)


def test_tiled_and_multiple_images_match_generate_with_chunked_prefill(idefics3, loaded: LoadedModel) -> None:
    wide = chat_with_image(loaded.processor, random_image(1, 48, 64), "w5 w6 w7")  # 2 x 2 tiles plus the global image
    narrow = chat_with_image(loaded.processor, random_image(2, 64, 20), "w5 w6 w7")  # 2 x 1 tiles plus the global image
    both = chat_with_image(loaded.processor, [random_image(2, 64, 20), random_image(1, 48, 64)], "w10")  # two images
    assert tuple(wide.multimodal.tensors["pixel_values"].shape) == (1, 5, 3, 32, 32)
    assert image_token_count(loaded, wide) == 5 * IMAGE_TOKENS_PER_TILE
    assert image_token_count(loaded, narrow) == 3 * IMAGE_TOKENS_PER_TILE
    assert image_token_count(loaded, both) == both.multimodal.tensors["pixel_values"].shape[1] * IMAGE_TOKENS_PER_TILE

    # Every image prompt is longer than a step's 16-token budget, so its prefill runs in chunks.
    engine = LLMEngine(loaded, EngineConfig(kv_cache_bytes=1 << 20, block_size=4, max_num_batched_tokens=16))
    prompts = {"wide": wide, "narrow": narrow, "both": both}
    for request_id, prompt in prompts.items():
        engine.add_request(EngineRequest(request_id, tuple(prompt.token_ids), greedy(6), multimodal=prompt.multimodal))
    engine.add_request(EngineRequest("text", (5, 6, 7, 8), greedy(6)))
    assert all(len(prompt.token_ids) > 16 for prompt in prompts.values())
    results = run_until_done(engine)
    for request_id, prompt in prompts.items():
        assert results[request_id].token_ids[0] == reference(idefics3, prompt, 6), request_id
    assert len({tuple(results[request_id].token_ids[0]) for request_id in prompts}) == 3
    assert engine.stats().kv_blocks_used == 0


def test_prefix_cache_does_not_reuse_one_image_for_another(idefics3, loaded: LoadedModel) -> None:
    first = chat_with_image(loaded.processor, random_image(4, 48, 64), "w5 w6")
    second = chat_with_image(loaded.processor, random_image(5, 48, 64), "w5 w6")
    assert first.token_ids == second.token_ids  # same layout: only the pixels differ
    engine = LLMEngine(loaded, EngineConfig(kv_cache_bytes=1 << 20, block_size=4))
    engine.add_request(EngineRequest("first", tuple(first.token_ids), greedy(4), multimodal=first.multimodal))
    run_until_done(engine)
    engine.add_request(EngineRequest("second", tuple(second.token_ids), greedy(4), multimodal=second.multimodal))
    result = run_until_done(engine)["second"]
    first_image_position = second.token_ids.index(loaded.model.config.image_token_id)
    assert result.usage is not None and result.usage.cached_tokens <= first_image_position
    assert result.token_ids[0] == reference(idefics3, second, 4)


def test_bad_image_inputs_are_a_clear_error(loaded: LoadedModel) -> None:
    prompt = chat_with_image(loaded.processor, random_image(6, 48, 64), "w5")
    engine = LLMEngine(loaded, EngineConfig(kv_cache_bytes=1 << 20, block_size=4))
    image_token_id = loaded.model.config.image_token_id
    one_too_few = list(prompt.token_ids)
    one_too_few.remove(image_token_id)
    with pytest.raises(InvalidRequestError, match="19 image placeholder tokens but the images give 20"):
        engine.add_request(EngineRequest("few", tuple(one_too_few), greedy(2), multimodal=prompt.multimodal))
    pixels = prompt.multimodal.tensors["pixel_values"]
    flat = MultimodalInputs({"pixel_values": pixels[0]}, prompt.multimodal.content_hashes)  # no image axis
    with pytest.raises(InvalidRequestError, match="could not be encoded"):
        engine.add_request(EngineRequest("flat", tuple(prompt.token_ids), greedy(2), multimodal=flat))
    assert not engine.has_unfinished_requests


def test_the_server_image_path_renders_an_idefics3_chat(loaded: LoadedModel) -> None:
    """Idefics3's processor needs character offsets, which a sanitizing tokenizer lacks: the server
    renders without sanitizing when the caller's text holds no control token."""
    image = random_image(7, 48, 64)
    prompt = asyncio.run(
        processed_prompt(
            loaded.processor,
            CHAT_TEMPLATE,
            chat_messages("w5 w6 w7"),
            [image],
            tools=None,
            template_kwargs={},
            limits=RequestLimits(),
        )
    )
    assert prompt.token_ids == chat_with_image(loaded.processor, image, "w5 w6 w7").token_ids


def test_a_forged_control_token_is_refused_on_the_idefics3_image_path(loaded: LoadedModel) -> None:
    special = loaded.processor.tokenizer.all_special_tokens[0]
    # Refused either by the sanitizing tokenizer or by the unsanitized fallback; the message names the token.
    with pytest.raises(InvalidRequestError, match=re.escape(special)):
        asyncio.run(
            processed_prompt(
                loaded.processor,
                CHAT_TEMPLATE,
                chat_messages(f"w5 {special} w7"),
                [random_image(9, 48, 64)],
                tools=None,
                template_kwargs={},
                limits=RequestLimits(),
            )
        )


def test_smolvlm_matches_generate() -> None:
    """SmolVLM is Idefics3's architecture under another name; its inputs have the same layout."""
    smolvlm = build_model(tiny_family_config(SmolVLMConfig, SmolVLMVisionConfig), SmolVLMForConditionalGeneration)
    words = tokenizer()
    prompt = chat_with_image(processor(), random_image(8, 48, 64), "w5 w6 w7")
    engine = LLMEngine(
        loaded_from_model(copy.deepcopy(smolvlm), words, processor=processor()),
        EngineConfig(kv_cache_bytes=1 << 20, block_size=4, max_num_batched_tokens=16),
    )
    assert engine.loaded.modalities == ("text", "image")
    engine.add_request(EngineRequest("smol", tuple(prompt.token_ids), greedy(6), multimodal=prompt.multimodal))
    assert run_until_done(engine)["smol"].token_ids[0] == reference(smolvlm, prompt, 6)


def test_a_processor_that_needs_missing_packages_is_a_load_error(tmp_path: Path) -> None:
    """SmolVLM's processor needs torchvision (its video processor) and num2words, which the server
    does not install: loading such a folder names the missing package instead of a raw ImportError."""
    if importlib.util.find_spec("torchvision") and importlib.util.find_spec("num2words"):
        pytest.skip("torchvision and num2words are both installed here: nothing is missing")
    folder = tmp_path / "tiny-smolvlm"
    model = build_model(tiny_family_config(SmolVLMConfig, SmolVLMVisionConfig), SmolVLMForConditionalGeneration)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SmolVLMImageProcessor"}))
    with pytest.raises(
        ModelLoadError, match="processor needs a package that is not installed: .*(orchvision|num2words)"
    ):
        load_model(LoadOptions(str(folder), device="cpu"))


def test_qwen2_vl_is_refused_at_load_time(tmp_path: Path) -> None:
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
        image_token_id=120,
        video_token_id=121,
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path / "tiny-qwen2-vl")
    with pytest.raises(UnsupportedModelError, match="3-D multimodal rotary positions"):
        load_model(LoadOptions(str(tmp_path / "tiny-qwen2-vl"), device="cpu"))
