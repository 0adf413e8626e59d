#!/usr/bin/env bash
# The GPU checks of the performance work, in one run on a CUDA machine without a package index.
#
# Needs the folder made by scripts/gpu_kit.sh (KIT, default .gpu-kit/) and a Python (PYTHON,
# default python3) that has torch with CUDA and transformers. Steps, in order of importance, each
# one logged and timed; a failing step does not stop the later ones, and a step that would start
# past the run's DEADLINE (seconds, default 540) is skipped, so that a lent machine's time holds:
#   1. install the kit's wheels into a prefix under WORK (what the Python already has is kept:
#      `transformers serve` runs on that machine's own transformers);
#   2. draw random-weight models of each of SHAPES (make_random_model.py): a ~1.07 B Llama shape
#      and SmolLM2-135M's own (`same`);
#   3. engine parity in float32 (TF32 off) on the last shape: greedy output under a mixed batch
#      equals model.generate but for near-ties (engine_parity.py);
#   4. scripts/bench.py against `transformers serve --continuous-batching` on each model, the
#      servers one after the other (they would share the GPU's memory);
#   5. engine parity in DTYPE (reported), and the engine alone at 64 streams on the first shape.
# Everything lands in WORK/results; OUT (default bench-results/gpu) gets summary.txt and one
# gpu-results.tar.gz of the results (bench.json files, plots, logs). Render a model's README
# section from it with `python scripts/bench.py --from-json .../bench.json --write-readme`.
#
#   bash scripts/gpu_check.sh                                   # on the GPU machine
#   PYTHON=.venv/bin/python DEVICE=cpu DTYPE=float32 SHAPES=tiny CONCURRENCY="1 4" bash scripts/gpu_check.sh  # dry run
#       (with a kit for that Python: KIT_PYTHON_VERSION=3.11 make gpu-kit)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIT=${KIT:-$ROOT/.gpu-kit}
OUT=${OUT:-$ROOT/bench-results/gpu}
WORK=${WORK:-/tmp/protoserve-gpu}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
SHAPES=${SHAPES:-"llama-1b same"}
CONCURRENCY=${CONCURRENCY:-"1 4 16 64"}
REPEATS=${REPEATS:-1}
OUTPUT_LEN=${OUTPUT_LEN:-64}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
DEADLINE=${DEADLINE:-540}

RESULTS=$WORK/results
mkdir -p "$OUT" "$RESULTS" "$WORK/models"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT" || exit 1
run_started=$(date +%s)

# step NAME COMMAND...: run with a time limit (STEP_TIMEOUT, cut to what is left of DEADLINE),
# output to RESULTS/NAME.log; its status and time go to the summary.
step() {
    local name=$1 started status left limit
    shift
    started=$(date +%s)
    left=$((DEADLINE - (started - run_started) - 10))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped, $((started - run_started)) s of the ${DEADLINE} s run spent" | tee -a "$SUMMARY"
        return 124
    fi
    limit=$((left < STEP_TIMEOUT ? left : STEP_TIMEOUT))
    echo "== $name (up to $limit s): $*"
    if declare -F "$1" >/dev/null; then
        STEP_LIMIT=$limit "$@" >"$RESULTS/$name.log" 2>&1
    else
        timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    fi
    status=$?
    tail -n 25 "$RESULTS/$name.log"
    echo "$name: exit $status, $(($(date +%s) - started)) s" | tee -a "$SUMMARY"
    return $status
}

model_name() { if [ "$1" = same ]; then echo smollm2-135m-random; else echo "$1-random"; fi; }

install_kit() {
    rm -rf "$WORK/prefix"
    timeout "$STEP_LIMIT" "$PYTHON" -m pip install -q --no-index --find-links "$KIT/wheels" --prefix "$WORK/prefix" \
        protoserve grpcio-health-checking grpcio-reflection llguidance jsonschema fastapi uvicorn starlette pydantic \
        openai python-multipart
}

describe_environment() {
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    timeout "$STEP_LIMIT" "$PYTHON" - <<'EOF'
import importlib.metadata as metadata, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("transformers", "grpcio", "protobuf", "protoserve", "fastapi", "openai", "accelerate", "aiohttp"):
    print(name, metadata.version(name))
EOF
}

step install install_kit || { echo "the kit does not install; nothing else can run" | tee -a "$SUMMARY"; exit 1; }
# The prefix's site folders (pure and platform-specific, one folder on most systems), first on the path.
site=$("$PYTHON" -c "
import sysconfig
paths = {'base': '$WORK/prefix', 'platbase': '$WORK/prefix'}
print(':'.join(dict.fromkeys(sysconfig.get_path(name, vars=paths) for name in ('purelib', 'platlib'))))")
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
export PATH=$WORK/prefix/bin:$PATH
step environment describe_environment
cat "$RESULTS/environment.log" >>"$SUMMARY"

for shape in $SHAPES; do
    step "model-$(model_name "$shape")" "$PYTHON" scripts/make_random_model.py --source "$KIT/smollm2" \
        --shape "$shape" --dtype "$DTYPE" --device "$DEVICE" --out "$WORK/models/$(model_name "$shape")"
done

parity() {  # parity DTYPE: the engine against generate on the last shape's model
    step "parity-$1" "$PYTHON" scripts/engine_parity.py --model "$WORK/models/$(model_name "${SHAPES##* }")" \
        --device "$DEVICE" --dtype "$1" --out "$RESULTS/parity-$1.json"
    grep -h "prompts in one batch" "$RESULTS/parity-$1.log" >>"$SUMMARY" 2>/dev/null
}
parity float32

read -r -a levels <<<"$CONCURRENCY"
for shape in $SHAPES; do
    name=$(model_name "$shape")
    step "bench-$name" "$PYTHON" scripts/bench.py --model "$WORK/models/$name" --device "$DEVICE" --dtype "$DTYPE" \
        --no-interleave --ts-python "$PYTHON" --concurrency "${levels[@]}" --repeats "$REPEATS" \
        --output-len "$OUTPUT_LEN" --start-timeout 240 --out-dir "$RESULTS/bench-$name"
    sed -n '/^server/,$p' "$RESULTS/bench-$name.log" 2>/dev/null | grep -v "^wrote" >>"$SUMMARY"
done

if [ "$DTYPE" != float32 ]; then parity "$DTYPE"; fi
step engine-alone "$PYTHON" scripts/bench_engine.py --model "$WORK/models/$(model_name "${SHAPES%% *}")" \
    --device "$DEVICE" --dtype "$DTYPE" --concurrency 64 --prompt-len 64 --output-len "$OUTPUT_LEN" --skip-baselines \
    --out "$RESULTS/bench_engine.json"
grep -h "^engine:" "$RESULTS/engine-alone.log" >>"$SUMMARY" 2>/dev/null

tar -czf "$OUT/gpu-results.tar.gz" -C "$WORK" results
echo
echo "== summary ($SUMMARY), $(($(date +%s) - run_started)) s in all"
cat "$SUMMARY"
