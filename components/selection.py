"""Which prompts to send to annotators within a label budget: `random`, `uncertainty` or `disagreement`.

Each candidate prompt comes with K sampled responses and their scores under M reward models (M = 1 for a single
reward model; an ensemble, or reward models standing for the AI judges, for `disagreement`):
`scores[p][m][k]`. `uncertainty` sends the prompts whose responses the (mean) reward model separates least — the
smallest gap between any two of them; `disagreement` sends those whose response order the M models split on most.
Labels spent where the reward model is already sure teach it little: both aim to reach random selection's accuracy
with fewer labels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import combinations

STRATEGIES = ("random", "uncertainty", "disagreement")
Scores = Sequence[Sequence[Sequence[float]]]  # [prompt][model][response]


def smallest_gap(scores: Sequence[float]) -> float:
    """The smallest difference between two responses' scores: near 0, the model can hardly tell them apart."""
    ordered = sorted(scores)
    return min(b - a for a, b in zip(ordered, ordered[1:], strict=False))


def order_disagreement(member_scores: Sequence[Sequence[float]]) -> float:
    """How much M models disagree on the order of K responses: the mean over response pairs of
    2·min(p, 1 − p), p the share of models ranking the first above the second (0: all agree; 1: an even split)."""
    k = len(member_scores[0])
    splits = []
    for i, j in combinations(range(k), 2):
        p = sum(scores[i] > scores[j] for scores in member_scores) / len(member_scores)
        splits.append(2 * min(p, 1 - p))
    return sum(splits) / len(splits)


def select_prompts(strategy: str, scores: Scores, budget: int, seed: int) -> list[int]:
    """Indices (ascending) of at most `budget` prompts to label, chosen by `strategy`; ties keep prompt order."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy = {strategy!r} is invalid: use one of {', '.join(STRATEGIES)}")
    if budget < 0:
        raise ValueError(f"budget = {budget} is invalid: use a number of prompts >= 0")
    n = len(scores)
    if strategy == "random":
        chosen = random.Random(seed).sample(range(n), min(budget, n))
    elif strategy == "uncertainty":
        mean = [[sum(column) / len(column) for column in zip(*members, strict=True)] for members in scores]
        chosen = sorted(range(n), key=lambda p: (smallest_gap(mean[p]), p))[:budget]
    else:
        chosen = sorted(range(n), key=lambda p: (-order_disagreement(scores[p]), p))[:budget]
    return sorted(chosen)
