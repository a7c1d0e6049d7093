"""The champion quality gate: does a newly evaluated policy replace the current champion?

Pure decision, no registry calls: given the new policy's value of the gate metric, the champion's value (or none),
a margin (and, where both evaluations give a standard error, how many of them the gain must also exceed) and which
direction is better, it says whether to promote and why, in a line a person can check (`0.71 > 0.65 + 0.02`).
The flow's register stage applies it to the MLflow model registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DIRECTIONS = ("higher", "lower")


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict: promote the new version to champion or keep the current one, and why."""

    promote: bool
    reason: str

    @property
    def outcome(self) -> str:
        """`promoted` or `kept` (the value of the `alignflow.champion` tag)."""
        return "promoted" if self.promote else "kept"


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def champion_gate(new: float | None, current: float | None, margin: float, direction: str = "higher",
                  already_champion: bool = False, spread: float | None = None, noise_z: float = 0.0) -> GateDecision:
    """Decide whether a policy scoring `new` replaces a champion scoring `current` (None: no champion yet).

    `direction` says which way is better; the new value must beat the champion's by more than `margin` (>= 0) and,
    where `spread` (the standard error of the difference, from both evaluations) is known, by more than `noise_z`
    of it too: a gain the held-out prompts cannot tell from noise does not move the champion.
    A missing or NaN new value never promotes; a champion without a value is replaced.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction = {direction!r} is invalid: use one of {', '.join(DIRECTIONS)}")
    if margin < 0 or math.isnan(margin):
        raise ValueError(f"margin = {margin!r} is invalid: use a number >= 0")
    if noise_z < 0 or math.isnan(noise_z):
        raise ValueError(f"noise_z = {noise_z!r} is invalid: use a number >= 0 (0: the margin alone decides)")
    if already_champion:
        return GateDecision(False, "already the champion")
    if new is None or math.isnan(new):
        return GateDecision(False, f"no value to compare ({new})")
    if current is None or math.isnan(current):
        return GateDecision(True, f"{_fmt(new)}: no champion value to beat")
    need, why = margin, ""
    if spread is not None and not math.isnan(spread) and noise_z * spread > margin:
        need, why = noise_z * spread, f" ({noise_z:g} standard errors; margin {_fmt(margin)})"
    if direction == "higher":
        promote = new > current + need
        return GateDecision(promote, f"{_fmt(new)} {'>' if promote else '<='} {_fmt(current)} + {_fmt(need)}{why}")
    promote = new < current - need
    return GateDecision(promote, f"{_fmt(new)} {'<' if promote else '>='} {_fmt(current)} - {_fmt(need)}{why}")
