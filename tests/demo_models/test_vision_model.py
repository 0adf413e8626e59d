"""The tiny LLaVA folder: loads with AutoProcessor and LLaVA classes, expands images, generates."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from protoserve.server.demo_models import DemoModels
from protoserve.server.demo_models.vision_model import IMAGE_TOKENS_PER_IMAGE
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration


@pytest.fixture(scope="module")
def processor(demo_models: DemoModels) -> object:
    return AutoProcessor.from_pretrained(demo_models.vision)


@pytest.fixture(scope="module")
def model(demo_models: DemoModels) -> LlavaForConditionalGeneration:
    loaded = AutoModelForImageTextToText.from_pretrained(demo_models.vision)
    assert isinstance(loaded, LlavaForConditionalGeneration)
    return loaded


def image_message(text: str, image_count: int = 1) -> list[dict[str, object]]:
    parts: list[dict[str, object]] = [{"type": "image"} for _ in range(image_count)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_generates_from_a_chat_with_one_image(processor: object, model: LlavaForConditionalGeneration) -> None:
    prompt = processor.apply_chat_template(image_message("What is in this picture?"), add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and prompt.endswith("<|im_start|>assistant\n")
    image = Image.new("RGB", (320, 200), (200, 30, 30))
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == IMAGE_TOKENS_PER_IMAGE == 196 == model.config.image_seq_length
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 6
    assert not (new_tokens == model.config.image_token_id).any()


def test_image_token_count_follows_the_number_of_images(
    processor: object, model: LlavaForConditionalGeneration
) -> None:
    prompt = processor.apply_chat_template(image_message("Compare.", image_count=2), add_generation_prompt=True)
    images = [Image.new("RGB", (64, 96), (0, 0, 255)), Image.new("L", (500, 300), 128)]
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 224, 224)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * IMAGE_TOKENS_PER_IMAGE
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    # The model makes exactly one embedding per placeholder the processor wrote.
    assert sum(features.shape[0] for features in image_features) == 2 * IMAGE_TOKENS_PER_IMAGE
    assert all(features.shape[-1] == model.config.text_config.hidden_size for features in image_features)


def test_text_only_chat_still_answers(processor: object, model: LlavaForConditionalGeneration) -> None:
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**inputs, max_new_tokens=9, do_sample=False)
    assert "Paris" in processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_mismatched_images_and_placeholders_are_rejected(processor: object) -> None:
    prompt = processor.apply_chat_template(image_message("Two?"), add_generation_prompt=True)
    images = [Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32))]
    with pytest.raises(ValueError):
        processor(text=prompt, images=images, return_tensors="pt")


def test_image_token_is_one_special_token(processor: object, model: LlavaForConditionalGeneration) -> None:
    tokenizer = processor.tokenizer
    assert tokenizer.encode("<image>", add_special_tokens=False) == [model.config.image_token_id]
    assert model.config.image_token_id == len(tokenizer) - 1 == 49152
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.vision_config.num_hidden_layers == 2 and model.config.vision_config.hidden_size == 192
