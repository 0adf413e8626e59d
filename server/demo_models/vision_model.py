"""Build a tiny LLaVA-style vision-language model for plumbing tests.

Text model: the converted SmolLM2-135M-Instruct (real weights, so text answers stay sensible).
Vision tower: a 2-layer SigLIP (width 192, 224 px, patch 16) with random weights from a fixed seed,
and a random projector. It loads, takes images and generates, but does not see: tests can check the
request path, the image-token accounting and output shapes, never the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from protoserve.server.demo_models.errors import DemoModelFetchError
from protoserve.server.demo_models.saved_folder import drop_runtime_tokenizer_settings, set_default_load_dtype

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 16
# SigLIP has no CLS token and the "full" strategy keeps every patch: one image = 14 x 14 = 196 tokens.
IMAGE_TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
RANDOM_SEED = 20261122
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML like SmolLM2's own template; content may be a string or a list of parts, where each
# image part ("image" or "image_url") becomes one <image> placeholder that the processor expands.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{ '" + IMAGE_TOKEN + "' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_vision_language_model(chat_dir: Path, destination: Path, report_step: Callable[[str], None]) -> None:
    """Build the tiny LLaVA from the chat model folder `chat_dir` and save model and processor."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    report_step("vision: loading the chat model as text model")
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if not isinstance(image_token_id, int):
        raise DemoModelFetchError(f"the tokenizer did not take {IMAGE_TOKEN} as one token: {image_token_id}")
    tokenizer.chat_template = CHAT_TEMPLATE
    text_model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
    text_model.config._name_or_path = ""

    report_step("vision: building the random SigLIP tower and projector")
    vision_config = SiglipVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,  # LLaVA takes the patch features, never SigLIP's pooled output
    )
    with torch.random.fork_rng():
        # Every random draw (the <image> embedding row, the tower, the projector) is seeded.
        torch.manual_seed(RANDOM_SEED)
        text_model.resize_token_embeddings(len(tokenizer))  # also sets text_model.config.vocab_size
        config = LlavaConfig(
            vision_config=vision_config,
            text_config=text_model.config,
            image_token_index=image_token_id,
            image_seq_length=IMAGE_TOKENS_PER_IMAGE,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
            tie_word_embeddings=text_model.config.tie_word_embeddings,
        )
        model = LlavaForConditionalGeneration(config)
    _copy_text_weights(text_model, model)
    model.generation_config = text_model.generation_config

    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )

    report_step("vision: saving model and processor")
    model.bfloat16().save_pretrained(destination)
    set_default_load_dtype(destination)
    processor.save_pretrained(destination)
    drop_runtime_tokenizer_settings(destination)


def _copy_text_weights(text_model: Any, model: Any) -> None:
    """Copy the causal LM's decoder and head into the LLaVA model; raises on any mismatch."""
    decoder_result = model.model.language_model.load_state_dict(text_model.model.state_dict(), strict=True)
    head_result = model.lm_head.load_state_dict(text_model.lm_head.state_dict(), strict=True)
    for result in (decoder_result, head_result):
        if result.missing_keys or result.unexpected_keys:
            raise DemoModelFetchError(f"text weights do not fit the LLaVA language model: {result}")
