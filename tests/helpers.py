"""Small shared test helpers: a tiny architecture and a synthetic corpus for models that only need to run."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

#: The whole pipeline on tiny budgets (~30 s): for tests of what surrounds the stages, not of learning.
TINY = ["experiment=smoke", "data.embedded.n_sft=300", "data.embedded.n_preference=300",
        "data.embedded.n_eval_preference=100", "data.embedded.n_prompts=64", "data.embedded.n_eval_prompts=32",
        "sft.args.num_train_epochs=1", "reward.args.num_train_epochs=1", "rl.total_updates=3",
        "eval.max_prompts=32", "num_threads=1"]  # fmt: skip
ARCH = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64,
        "activation_function": "gelu"}
WORDS = "the a cat dog sat ran on under mat log good bad very quite happy sad big small red blue".split()


def synthetic_corpus(n_lines: int, seed: int) -> list[str]:
    """Short random sentences over a small word list: enough for a BPE vocabulary of ~200."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(n_lines)]


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop a server started with `start_new_session=True` and everything it started (uvicorn, job runners,
    workers): SIGTERM to its process group, then SIGKILL to whatever is left (a child can outlive the leader)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


#: What an alignflow process of its own must not inherit from the test process (its Prefect harness, store, run).
INHERITED = ("ALIGNFLOW_ROOT", "PREFECT_HOME", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
             "HF_DATASETS_CACHE", "MLFLOW_RUN_ID", "ALIGNFLOW_SWEEP_RUN_ID")


def cli_env(root: Path | None = None, threads: int = 1, **extra: str) -> dict[str, str]:
    """The environment of an alignflow process started by a test: offline, `threads` torch threads, its own store
    under `root` (Prefect's home and the datasets cache with it), then `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               ALIGNFLOW_PREFECT_SERVER="none")  # never a developer's own server on :4200
    if root is not None:
        env["ALIGNFLOW_ROOT"] = str(root)
    return {**env, **extra}


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Wait until GET `url` answers 200; fail with the server's log tail if `proc` exits or `timeout` passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not answer {url} in {timeout:.0f} s"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def pipeline_store(root: Path, overrides: list[str]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """One pipeline run, in-process, into a fresh store at `root`: (root, its summary); the store stays set while
    the block runs (module- and session-scoped fixtures cannot use `monkeypatch`)."""
    from flows.pipeline import alignflow

    patch = pytest.MonkeyPatch()
    patch.setenv("ALIGNFLOW_ROOT", str(root))
    try:
        yield root, alignflow(overrides=overrides)
    finally:
        patch.undo()
