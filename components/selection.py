"""Which prompts to send to annotators within a label budget: `random`, `uncertainty` or `disagreement`.

Each candidate prompt comes with K sampled responses and their scores under M reward models (M = 1 for a single
reward model; an ensemble, or reward models standing for the AI judges, for `disagreement`):
`scores[p][m][k]`. `uncertainty` sends the prompts whose responses the (mean) reward model separates least — the
smallest gap between any two of them; `disagreement` sends those whose response order the M models split on most.
Labels spent where the reward model is already sure teach it little: both aim to reach random selection's accuracy
with fewer labels.
"""

from __future__ import annotations

import math
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


# ------------------------------------------------------------------------------ pool-based active learning rounds
def label_schedule(seed_size: int, batch_size: int, budget: int) -> list[int]:
    """Labels spent (prompts ranked) after each round of pool-based active learning: a random seed batch of
    `seed_size`, then `batch_size` more per round until `budget`; the last round is cut to land on `budget`."""
    if seed_size < 1 or batch_size < 1 or budget < seed_size:
        raise ValueError(f"seed_size = {seed_size}, batch_size = {batch_size}, budget = {budget} is invalid: use "
                         "seed_size >= 1, batch_size >= 1 and budget >= seed_size")
    schedule = [seed_size]
    while schedule[-1] < budget:
        schedule.append(min(budget, schedule[-1] + batch_size))
    return schedule


def select_from_pool(strategy: str, candidates: Sequence[int], scores: Scores, budget: int, seed: int) -> list[int]:
    """`select_prompts` over the still unlabelled part of a pool: `candidates` are pool indices and `scores[i]`
    belongs to `candidates[i]`; returns the chosen pool indices (ascending)."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} rows of scores")
    return sorted(candidates[i] for i in select_prompts(strategy, scores, budget, seed))


def bootstrap(items: Sequence[int], seed: int) -> list[int]:
    """A bootstrap resample of `items` (as many draws, with replacement, seeded): one ensemble member's data."""
    rng = random.Random(seed)
    return [rng.choice(items) for _ in items]


def labels_to_reach(labels: Sequence[int], accuracy: Sequence[float], target: float) -> float | None:
    """The labels at which a learning curve first reaches `target`, interpolated linearly between rounds (the
    first round's labels when it starts at or above it); None when the curve never gets there."""
    if len(labels) != len(accuracy) or not labels:
        raise ValueError(f"{len(labels)} label counts but {len(accuracy)} accuracies: give one per round (>= 1)")
    if accuracy[0] >= target:
        return float(labels[0])
    for (n0, a0), (n1, a1) in zip(zip(labels, accuracy, strict=True), zip(labels[1:], accuracy[1:], strict=True),
                                  strict=False):  # fmt: skip
        if a1 >= target:
            return n0 + (n1 - n0) * (target - a0) / (a1 - a0)
    return None


def label_share(labels: Sequence[int], accuracy: Sequence[float], baseline_labels: Sequence[int],
                baseline_accuracy: Sequence[float]) -> float | None:
    """Labels a strategy needed to reach the baseline's (random selection's) final accuracy, as a share of the
    labels the baseline spent to get there: < 1 saves labels (the goal is <= 0.6); None when it never did."""
    needed = labels_to_reach(labels, accuracy, baseline_accuracy[-1])
    return None if needed is None else needed / baseline_labels[-1]


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """The pointwise mean of learning curves measured at the same label counts (one curve per repeat)."""
    if not curves or len({len(c) for c in curves}) != 1:
        raise ValueError("mean_curve needs one or more curves of equal length")
    return [sum(values) / len(values) for values in zip(*curves, strict=True)]


def pair_information(scores: Sequence[float]) -> float:
    """How much a ranking of K responses is expected to teach a Bradley–Terry reward model: the mean over response
    pairs of 4·p·(1 − p), p = sigmoid(score gap) the model's own probability of the order (1: every pair a coin
    flip; near 0: the model is sure of every pair). Unlike `smallest_gap` it counts every pair a ranking labels,
    not only the closest one (a ranking of K labels all K(K−1)/2)."""
    values = [4 * p * (1 - p) for p in (1 / (1 + math.exp(-abs(a - b))) for a, b in combinations(scores, 2))]
    return sum(values) / len(values)


def most_informative(scores: Scores, budget: int) -> list[int]:
    """Indices (ascending) of the `budget` prompts with the highest `pair_information` under the mean of the M
    models (ties keep prompt order): an `uncertainty` variant that values all of a ranking's pairs."""
    if budget < 0:
        raise ValueError(f"budget = {budget} is invalid: use a number of prompts >= 0")
    mean = [[sum(column) / len(column) for column in zip(*members, strict=True)] for members in scores]
    return sorted(sorted(range(len(scores)), key=lambda p: (-pair_information(mean[p]), p))[:budget])
