"""Win rates over held-out prompts and their standard errors: plain Python, so the comparison view and the champion
gate read them without loading torch."""

from __future__ import annotations

import math

STDERR = "_stderr"  # suffix of a metric's standard error over the held-out prompts (`eval/win_rate_vs_sft_stderr`)


def outcomes(ours: list[float], theirs: list[float]) -> list[float]:
    """Per prompt: 1 where `ours` beats `theirs`, 0.5 for a tie, 0 for a loss."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)]


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """Share of prompts where `ours` beats `theirs`, ties counting half."""
    wins = outcomes(ours, theirs)
    return sum(wins) / len(wins)


def win_rate_stderr(ours: list[float], theirs: list[float]) -> float:
    """Standard error of `win_rate` over the prompts: the per-prompt outcomes' (1, 0.5, 0) sample standard deviation
    over the root of their number. How far another sample of prompts could move the win rate: two runs' win rates
    closer than about twice the root of their summed squared errors are not told apart by these prompts."""
    if len(ours) < 2:
        raise ValueError("a standard error needs at least two prompts")
    wins = outcomes(ours, theirs)
    rate = sum(wins) / len(wins)
    return (sum((w - rate) ** 2 for w in wins) / (len(wins) - 1) / len(wins)) ** 0.5


def difference_stderr(a: float, b: float) -> float:
    """Standard error of the difference of two independent estimates with standard errors `a` and `b`."""
    return math.hypot(a, b)
