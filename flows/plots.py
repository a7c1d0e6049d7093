"""The comparison plots (matplotlib `Figure`s, no pyplot state): reward–KL frontier, over-optimisation, curves.

Each takes the comparison table of `flows.compare` (one row per pipeline run, indexed by run name, with the
`variant` column and the `eval/*` metrics) and returns a figure, or None when the runs hold nothing to draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from components.analysis import GaoFit, fit_gao_rl, overoptimization_onset, pareto_front

KL = "eval/kl_to_sft"
GOLD, GOLD_SFT = "eval/gold_reward_mean", "eval/gold_reward_mean_sft"
PROXY, PROXY_SFT = "eval/proxy_reward_mean", "eval/proxy_reward_mean_sft"


def _has(table: pd.DataFrame, *columns: str) -> pd.Series:
    """Rows where every column is present and finite."""
    mask = pd.Series(True, index=table.index)
    for column in columns:
        if column not in table:
            return pd.Series(False, index=table.index)
        mask &= pd.to_numeric(table[column], errors="coerce").notna()
    return mask


def frontier_figure(table: pd.DataFrame, fallback: str = "eval/win_rate_vs_sft") -> Figure | None:
    """Gold reward (or `fallback` without a gold reward) against KL to SFT, one line per variant, with the
    Pareto front of all runs and SFT itself at KL 0."""
    y_name = GOLD if _has(table, KL, GOLD).any() else fallback
    rows = table[_has(table, KL, y_name)]
    if rows.empty:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for variant, group in rows.groupby("variant", sort=False):
        group = group.sort_values(KL)
        ax.plot(group[KL], group[y_name], "o-", label=str(variant))
        for name, row in group.iterrows():
            ax.annotate(_short(str(name), str(variant)), (row[KL], row[y_name]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    kl, value = list(rows[KL]), list(rows[y_name])
    if y_name == GOLD and _has(rows, GOLD_SFT).any():
        sft = float(rows[GOLD_SFT].mean())
        ax.plot([0.0], [sft], "k*", markersize=10, label="SFT")
        kl, value = [0.0, *kl], [sft, *value]
    front = pareto_front(kl, value)
    ax.step([kl[i] for i in front], [value[i] for i in front], "--", color="grey", where="post", alpha=0.7,
            label="Pareto front")
    ax.set(xlabel=f"KL to SFT ({KL})", ylabel=y_name, title="Reward–KL frontier")
    ax.legend(fontsize=8)
    return fig


def _short(name: str, variant: str) -> str:
    """A run's name without the leading pipeline name its variant already shows."""
    head = variant.split("/")[0]
    if not name.startswith(head):
        return name
    return name[len(head):].strip() or name


@dataclass(frozen=True)
class Overoptimization:
    """What the over-optimisation view found: the figure, the Gao fit (None with < 2 points) and the onset."""

    figure: Figure
    fit: GaoFit | None
    onset_kl: float | None  # KL from which the proxy keeps rising while the gold falls (None: never)
    n_runs: int


def overoptimization_figure(table: pd.DataFrame) -> Overoptimization | None:
    """Gold and proxy reward gains over SFT against d = √KL for the RL runs, with Gao et al.'s fitted gold
    curve R(d) = d(α − β ln d) and the KL where proxy keeps rising while gold falls flagged."""
    rows = table[_has(table, KL, GOLD, GOLD_SFT, PROXY, PROXY_SFT)]
    if rows.empty:
        return None
    d = np.sqrt(np.clip(rows[KL].to_numpy(float), 0.0, None))
    gold = (rows[GOLD] - rows[GOLD_SFT]).to_numpy(float)
    proxy = (rows[PROXY] - rows[PROXY_SFT]).to_numpy(float)
    try:
        fit = fit_gao_rl(d, gold)
    except ValueError:  # fewer than two distinct distances
        fit = None
    onset = overoptimization_onset(d, proxy, gold)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(d, gold, "o", color="tab:green", label="gold reward − SFT")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    if fit is not None:
        grid = np.linspace(0.0, max(float(d.max()), fit.peak_d or 0.0) * 1.1 + 1e-9, 200)
        ax.plot(grid, fit(grid), "-", color="tab:green", alpha=0.6,
                label=f"fit d(α − β ln d): α={fit.alpha:.3g}, β={fit.beta:.3g}")
        if fit.peak_d is not None and fit.peak_d <= grid[-1]:
            ax.plot([fit.peak_d], [fit.peak_reward], "v", color="tab:green",
                    label=f"fitted gold peak at KL={fit.peak_kl:.3g}")
    proxy_ax = ax.twinx()
    proxy_ax.plot(d, proxy, "s", color="tab:orange", label="proxy (reward model) − SFT")
    proxy_ax.set_ylabel("proxy reward gain", color="tab:orange")
    if onset is not None:
        ax.axvline(onset, color="tab:red", linestyle=":",
                   label=f"proxy ↑ while gold ↓ beyond KL={onset ** 2:.3g}")
    ax.set(xlabel="d = √KL to SFT", ylabel="gold reward gain", title="Over-optimisation (Gao et al. 2022)")
    _align_zero(ax, proxy_ax)
    handles = ax.get_legend_handles_labels()
    more = proxy_ax.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="best")
    return Overoptimization(fig, fit, None if onset is None else onset**2, len(rows))


def _align_zero(left, right) -> None:
    """Put 0 at the same height on both y axes (gains over SFT: above the line is better on both)."""
    limits = [list(a.get_ylim()) for a in (left, right)]
    for lim in limits:
        lim[0], lim[1] = min(lim[0], 0.0), max(lim[1], 0.0)
    share = max(-lo / (hi - lo) for lo, hi in limits if hi > lo)  # the fraction of the height below 0
    for axis, (lo, hi) in zip((left, right), limits, strict=True):
        if share < 1:
            lo = min(lo, -share / (1 - share) * hi) if hi > 0 else lo
        axis.set_ylim(lo, hi)


def curves_figure(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> Figure | None:
    """Training curves by step: one panel per metric (e.g. `ppo/mean_reward`, `ppo/kl`), one line per run."""
    names = list(dict.fromkeys(m for per_run in curves.values() for m, points in per_run.items()
                               if len(points) > 1))
    if not names:
        return None
    columns = min(2, len(names))
    rows = math.ceil(len(names) / columns)
    fig = Figure(figsize=(6 * columns, 3.5 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        for label, per_run in curves.items():
            points = sorted(per_run.get(name, []))
            if len(points) > 1:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
        ax.set(title=name, xlabel="step")
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    return fig
