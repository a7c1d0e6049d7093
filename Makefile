# Two commands do all set-up: `make run` (the embedded default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser-deps run test test-crash test-server test-cluster test-accelerate test-browser test-all lint bench clean

setup: $(STAMP)

# Idempotent: the stamp is rebuilt only when pyproject.toml changes.
# The CPU build of torch goes in first; a looser spec would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/alignflow $(ARGS)

test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-crash: setup
	$(BIN)/pytest -q -m crash $(PYTEST_ARGS)

test-server: setup
	$(BIN)/pytest -q -m server $(PYTEST_ARGS)

# PostgreSQL's server binaries (initdb, pg_ctl) must be on PATH; the test starts and removes its own cluster.
test-cluster: setup
	$(BIN)/pytest -q -m cluster $(PYTEST_ARGS)

# SFT, reward, PPO and DPO and RLHF pipelines under `accelerate launch` in two CPU processes (gloo), one thread each.
test-accelerate: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -m accelerate $(PYTEST_ARGS)

# Debian's chromium for the browser tests (root, as on CI; a no-op where it is installed).
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation)

test-browser: setup browser-deps
	$(BIN)/pytest -q -m browser $(PYTEST_ARGS)

test-all: setup browser-deps
	$(BIN)/pytest -q -m "slow or crash or server or browser or cluster or accelerate or not (slow or crash or server or browser or cluster or accelerate)" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf mlruns .alignflow outputs multirun
