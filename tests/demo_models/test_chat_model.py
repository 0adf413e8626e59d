"""The converted SmolLM2-135M-Instruct folder loads with plain transformers and answers."""

from __future__ import annotations

import json

import torch
from protoserve.server.demo_models import DemoModels
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_chat_model_answers_the_capital_of_france(demo_models: DemoModels) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_models.chat)
    model = AutoModelForCausalLM.from_pretrained(demo_models.chat)
    assert model.dtype == torch.float32  # stored as bfloat16, loads as float32 by default
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not hasattr(model.config, "quantization_config")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert output[0, -1].item() == tokenizer.eos_token_id == model.generation_config.eos_token_id


def test_chat_folder_has_safetensors_template_and_generation_config(demo_models: DemoModels) -> None:
    files = {path.name for path in demo_models.chat.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".gguf") for name in files)
    tokenizer = AutoTokenizer.from_pretrained(demo_models.chat)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert len(tokenizer) == 49152
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.model_max_length == 8192
    generation = json.loads((demo_models.chat / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    config = json.loads((demo_models.chat / "config.json").read_text())
    assert config["dtype"] == "float32" and config["vocab_size"] == 49152
