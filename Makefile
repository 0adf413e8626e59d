# The two commands: `make serve` and `make test`. Everything else is for developers.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch kept on this machine's disk; pinning it keeps pip from downloading CUDA wheels.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: serve test soak bench bench-engine gpu-kit system-deps venv lint proto clean

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[server,translator,quant,agent,dev]" "$(TORCH_PIN)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# Debian tools the tests use: espeak-ng speaks test audio, sox resamples it.
system-deps:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox >/dev/null; }

serve: venv
	$(BIN)/protoserve models fetch-demo
	$(BIN)/protoserve up

test: venv system-deps
	$(BIN)/protoserve models fetch-demo
	$(BIN)/python -m pytest -q

soak: venv system-deps
	$(BIN)/python -m pytest -q -m slow

bench-engine: venv
	$(BIN)/python scripts/bench_engine.py

# transformers serve, the bench's baseline, in a venv of its own (its serving extras stay out of ours).
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH_PIN)" "transformers[serving]" "$(TORCH_PIN)"
	touch $@

bench: venv $(BENCH_VENV)/.installed
	$(BIN)/protoserve models fetch-demo
	$(BIN)/python scripts/bench.py --ts-python $(BENCH_VENV)/bin/python

# Wheels and tokenizer for an offline CUDA machine; there: `bash scripts/gpu_check.sh` (the GPU checks).
gpu-kit: venv
	$(BIN)/protoserve models fetch-demo
	PYTHON=$(BIN)/python bash scripts/gpu_kit.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy client server translator

proto: venv
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
