"""Touch-ups of a `save_pretrained` folder: default load dtype, and no settings of the run that saved it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def set_default_load_dtype(folder: Path, dtype_name: str = "float32") -> None:
    """Rewrite every `dtype` entry of `folder/config.json` (sub-configs too) to `dtype_name`.

    transformers' `from_pretrained` uses the config's dtype when none is asked for, so a folder whose
    safetensors hold bfloat16/float16 then loads as float32, the fast dtype on CPU.
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    _replace_dtype(config, dtype_name)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dtype(node: Any, dtype_name: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("dtype", "torch_dtype") and isinstance(value, str):
                node[key] = dtype_name
            else:
                _replace_dtype(value, dtype_name)


# Keys transformers copies from the loading call into tokenizer_config.json; they describe how the
# source was loaded (and vary with HF_HUB_OFFLINE), not the tokenizer.
RUNTIME_TOKENIZER_KEYS = ("is_local", "local_files_only")


def drop_runtime_tokenizer_settings(folder: Path) -> None:
    """Remove loading-call settings from `folder/tokenizer_config.json`, so rebuilds are byte-identical."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in RUNTIME_TOKENIZER_KEYS:
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
