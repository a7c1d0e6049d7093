# Two commands do all set-up: `make run` (the embedded default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser-deps label-studio-deps label-studio run test test-crash test-server test-cluster test-accelerate test-feedback test-browser test-all lint bench clean

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

# Two pytest workers (pytest-xdist), one torch thread each; tests/conftest.py sends each module to one worker whole,
# the modules sharing the smoke store first. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

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

# Label Studio in its own virtualenv (its Django stack stays out of ours); alignflow talks to it through the SDK.
LS_VENV := .venv-labelstudio
LS_DATA ?= .alignflow/label-studio
LS_PORT ?= 8080

label-studio-deps: $(LS_VENV)/.installed

$(LS_VENV)/.installed:
	test -x $(LS_VENV)/bin/python || $(PY) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q label-studio==1.23.2 "sentry-sdk<3"  # sentry-sdk 3.0 breaks `label-studio init`
	touch $@

# Label Studio on 127.0.0.1:$(LS_PORT), its data under $(LS_DATA); the first start creates the admin
# $LABEL_STUDIO_USERNAME whose API token is $LABEL_STUDIO_API_KEY (what feedback=human_loop reads).
label-studio: label-studio-deps
	LABEL_STUDIO_BASE_DATA_DIR=$(LS_DATA) $(LS_VENV)/bin/label-studio start --data-dir $(LS_DATA) \
		-p $(LS_PORT) --host http://127.0.0.1:$(LS_PORT) --internal-host 127.0.0.1 --no-browser \
		--username "$${LABEL_STUDIO_USERNAME:-admin@alignflow.local}" \
		--password "$${LABEL_STUDIO_PASSWORD:?export LABEL_STUDIO_PASSWORD}" \
		--user-token "$${LABEL_STUDIO_API_KEY:?export LABEL_STUDIO_API_KEY (20+ characters)}" --enable-legacy-api-token

# The feedback loop through real Label Studio and Prefect servers (simulated annotators rank through the API).
test-feedback: setup label-studio-deps
	$(BIN)/pytest -q -m feedback_loop $(PYTEST_ARGS)

test-all: setup browser-deps label-studio-deps
	$(BIN)/pytest -q -m "slow or crash or server or browser or cluster or accelerate or feedback_loop or not (slow or crash or server or browser or cluster or accelerate or feedback_loop)" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_ppo_vs_trl.py
	$(BIN)/python benchmarks/bench_sweep.py

clean:
	rm -rf mlruns .alignflow outputs multirun
