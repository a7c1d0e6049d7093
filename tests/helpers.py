"""Small shared test helpers: a tiny architecture and a synthetic corpus for models that only need to run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

ARCH = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64}
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
