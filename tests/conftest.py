"""Shared test fixtures: one Prefect test harness per session, isolated stores, a quiet torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("ALIGNFLOW_PREFECT_SERVER", "none")  # the harness, never a developer's server on :4200
import flows  # noqa: E402, F401  (sets Prefect's environment defaults before prefect is imported)

torch.set_num_threads(2)


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
