"""The callables components take from their caller, one home each: rewards, gold scores and step logging.

They keep components free of tracking and of any particular reward model: a flow, a notebook or a test passes
plain functions with these signatures.
"""

from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[[list[str], list[str]], list[float]]
"""(prompts, completions) → one proxy reward per pair (e.g. a trained reward model)."""

GoldFn = Callable[[list[str], list[str]], list[float]]
"""(prompts, completions) → one gold reward per pair: the ground truth a task may know (the review task does)."""

StepLogger = Callable[[int, dict[str, float]], None]
"""`on_log(step, metrics)`: trainers and our PPO report their numbers through it."""
