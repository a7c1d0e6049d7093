"""Small shared test helpers: a tiny architecture and a synthetic corpus for models that only need to run."""

from __future__ import annotations

import random

ARCH = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64}
WORDS = "the a cat dog sat ran on under mat log good bad very quite happy sad big small red blue".split()


def synthetic_corpus(n_lines: int, seed: int) -> list[str]:
    """Short random sentences over a small word list: enough for a BPE vocabulary of ~200."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(n_lines)]
