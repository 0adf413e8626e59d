#!/usr/bin/env bash
# Pack what an offline CUDA machine needs for scripts/gpu_check.sh into one folder (default .gpu-kit/).
#
# The GPU machine is expected to have Python with torch (CUDA), transformers, accelerate, aiohttp,
# psutil and matplotlib, and no package index. This fetches, on a machine that has one:
#   wheels/  protoserve itself, the gRPC, protobuf, llguidance and jsonschema versions this checkout's
#            .venv runs (audio decoding, PyAV, is left out: the check serves chat models only), and what
#            `transformers serve` needs beyond transformers (fastapi, uvicorn, openai, pydantic, ...),
#            for the GPU machine's Python (KIT_PYTHON_VERSION, default 3.12) on x86_64 Linux;
#   smollm2/ the demo chat model's config, tokenizer and chat template (no weights: gpu_check.sh
#            draws random weights of that shape and of a ~1B Llama shape there).
# Copy the folder next to the checkout there (or carry it) and run `bash scripts/gpu_check.sh`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIT=${KIT:-$ROOT/.gpu-kit}
PY_VERSION=${KIT_PYTHON_VERSION:-3.12}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

rm -rf "$KIT"
mkdir -p "$KIT/wheels" "$KIT/smollm2"

version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
    platforms+=(--platform "$tag")
done
download=("$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" --implementation cp
    "${platforms[@]}" -d "$KIT/wheels")

# protoserve's own runtime pins, exactly as tested here (the generated stubs check the grpcio version).
"${download[@]}" --no-deps \
    "grpcio==$(version grpcio)" \
    "grpcio-health-checking==$(version grpcio-health-checking)" \
    "grpcio-reflection==$(version grpcio-reflection)" \
    "protobuf==$(version protobuf)"
# The server's pure-runtime needs that a torch image seldom has (tool-call grammars, JSON schemas).
"${download[@]}" "llguidance==$(version llguidance)" "jsonschema==$(version jsonschema)"
# transformers serve's [serving] extra without transformers and torch, with their own dependencies.
"${download[@]}" fastapi uvicorn starlette "pydantic>=2" "openai>=1.98" python-multipart
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" "$ROOT"

chat_model=$("$PYTHON" -c "from protoserve.server.demo_models import fetch_demo_models; print(fetch_demo_models().chat)")
for name in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
    chat_template.jinja; do
    if [ -f "$chat_model/$name" ]; then cp "$chat_model/$name" "$KIT/smollm2/"; fi
done
echo "$KIT: $(find "$KIT/wheels" -name "*.whl" | wc -l) wheels, $(du -sh "$KIT" | cut -f1) in all"
