"""Shared test fixtures: one Prefect test harness per session, isolated stores, a quiet torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("ALIGNFLOW_PREFECT_SERVER", "none")  # the harness, never a developer's server on :4200
import flows  # noqa: E402, F401  (sets Prefect's environment defaults before prefect is imported)

#: Test modules that share one session fixture (conftest.smoke_run): under `pytest -n`, one worker runs them all.
SHARED_STORE = {"test_pipeline.py", "test_variants.py"}
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))  # 2 cores, 2 workers: 1 thread each


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: `make test` runs `pytest -n 2 --dist loadscope`
def pytest_xdist_make_scheduler(config, log):
    """Each test module is one unit of work, sent to one worker whole, so its module fixtures are built once; the
    modules sharing the smoke store are one unit, run in their usual order."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "the smoke store" if Path(module).name in SHARED_STORE else module

    return ByModule(config, log)


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N`: the smoke store's unit, the longest, is sent out first (with --no-loadscope-reorder)."""
    if WORKERS > 1:
        items.sort(key=lambda item: item.path.name not in SHARED_STORE)  # stable: the order within stays


@pytest.fixture
def one_thread():
    """Tiny models run as fast on one thread, and two OpenMP threads slow down many-fold when another torch
    process shares the two cores; restores the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A saved random 2-layer GPT-2 (`tests.helpers.ARCH`) with a ~200-token BPE tokenizer trained on
    `synthetic_corpus`: for any test that needs some tiny causal LM checkpoint; read-only (write elsewhere)."""
    from components.modeling import build_base_checkpoint
    from tests.helpers import ARCH, synthetic_corpus

    out = tmp_path_factory.mktemp("tiny_checkpoint")
    return build_base_checkpoint(synthetic_corpus(300, 0), ARCH, vocab_size=200, seed=0, out_dir=out)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server + database for the whole session (started only by tests that run flows)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An isolated alignflow root (artifacts, mlruns, results) for one test."""
    monkeypatch.setenv("ALIGNFLOW_ROOT", str(tmp_path / "root"))
    return tmp_path / "root"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never touch the network: hub loads must come from local files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield
    os.environ.pop("MLFLOW_RUN_ID", None)


SMOKE = ["experiment=smoke"]


@pytest.fixture(scope="session")
def smoke_run(prefect_harness, tmp_path_factory):
    """One store shared by the end-to-end tests, holding a first RLHF run of `experiment=smoke`.

    Later tests run other pipelines and reruns against it, so they reuse (and assert the reuse of) its stages.
    """
    from tests.helpers import pipeline_store

    with pipeline_store(tmp_path_factory.mktemp("smoke"), SMOKE) as (root, summary):
        yield root, summary
