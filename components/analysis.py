"""Reward over-optimisation analysis: the gold-reward curve of Gao et al. 2022 and where proxy and gold part ways.

Gao, Schulman & Hilton, "Scaling Laws for Reward Model Overoptimization" (2022): with d = √KL(π‖π_init), the gold
reward gained by RL follows R(d) = d (α − β ln d). The model is linear in (α, β), so ordinary least squares on
the features (d, −d ln d) fits it exactly; its peak is where dR/dd = α − β − β ln d = 0, at d* = exp(α/β − 1),
with R(d*) = β d*. Plain numpy: no tracking or plotting here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaoFit:
    """A fitted R(d) = d (α − β ln d) with its peak (None when β ≤ 0: the curve never turns down)."""

    alpha: float
    beta: float
    rmse: float
    n_points: int

    def __call__(self, d: np.ndarray | Sequence[float] | float) -> np.ndarray:
        """The fitted gold reward gain at distances `d` (R(0) = 0)."""
        return gao_rl(d, self.alpha, self.beta)

    @property
    def peak_d(self) -> float | None:
        """√KL at which the fitted gold reward is highest."""
        return math.exp(self.alpha / self.beta - 1.0) if self.beta > 0 else None

    @property
    def peak_kl(self) -> float | None:
        """KL at the fitted gold peak."""
        return None if self.peak_d is None else self.peak_d ** 2

    @property
    def peak_reward(self) -> float | None:
        """The fitted gold reward gain at its peak."""
        return None if self.peak_d is None else self.beta * self.peak_d


def _d_log_d(d: np.ndarray) -> np.ndarray:
    """d ln d with its limit 0 at d = 0."""
    out = np.zeros_like(d, dtype=float)
    positive = d > 0
    out[positive] = d[positive] * np.log(d[positive])
    return out


def gao_rl(d: np.ndarray | Sequence[float] | float, alpha: float, beta: float) -> np.ndarray:
    """R(d) = d (α − β ln d), the RL form of Gao et al.'s gold-reward curve (d = √KL ≥ 0)."""
    d = np.asarray(d, dtype=float)
    return alpha * d - beta * _d_log_d(d)


def fit_gao_rl(d: Sequence[float], gain: Sequence[float]) -> GaoFit:
    """Least-squares α, β of R(d) = d (α − β ln d) through points (d, gold reward gain over the initial policy).

    Points at d = 0 carry no information (R(0) = 0 whatever α, β); at least two distinct d > 0 are needed.
    """
    d_arr, y = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    if d_arr.shape != y.shape:
        raise ValueError(f"d and gain differ in length: {d_arr.shape} vs {y.shape}")
    if np.any(d_arr < 0) or not np.all(np.isfinite(d_arr)) or not np.all(np.isfinite(y)):
        raise ValueError("d must be finite and >= 0 (d = √KL), gains finite")
    if len(np.unique(d_arr[d_arr > 0])) < 2:
        raise ValueError("the fit needs at least two distinct d > 0")
    features = np.stack([d_arr, -_d_log_d(d_arr)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(features, y, rcond=None)
    rmse = float(np.sqrt(np.mean((features @ np.array([alpha, beta]) - y) ** 2)))
    return GaoFit(float(alpha), float(beta), rmse, int(len(y)))


def overoptimization_onset(d: Sequence[float], proxy: Sequence[float], gold: Sequence[float]) -> float | None:
    """The first d (sorted ascending) from which the proxy reward keeps rising while the gold reward falls.

    Returns the d of the last point before the split (where gold peaked on the way), or None when proxy and gold
    never move apart. Reward hacking, seen from outside: the reward model still says "better", the gold says worse.
    """
    order = np.argsort(np.asarray(d, dtype=float), kind="stable")
    xs, ps, gs = (np.asarray(v, dtype=float)[order] for v in (d, proxy, gold))
    for i in range(len(xs) - 1):
        if ps[i + 1] > ps[i] and gs[i + 1] < gs[i]:
            return float(xs[i])
    return None


def pareto_front(cost: Sequence[float], value: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher value), by increasing cost."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -value[i]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if value[i] > best:
            front.append(i)
            best = value[i]
    return front
