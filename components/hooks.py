"""The callables components take from their caller, one home each: rewards, gold scores and step logging.

They keep components free of tracking and of any particular reward model: a flow, a notebook or a test passes
plain functions with these signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RewardFn = Callable[[list[str], list[str]], list[float]]
"""(prompts, completions) → one proxy reward per pair (e.g. a trained reward model)."""

GoldFn = Callable[[list[str], list[str]], list[float]]
"""(prompts, completions) → one gold reward per pair: the ground truth a task may know (the review task does)."""

StepLogger = Callable[[int, dict[str, float]], None]
"""`on_log(step, metrics)`: trainers and our PPO report their numbers through it."""

TokenRewardFn = Callable[["torch.Tensor", "torch.Tensor"], list[float]]
"""(input_ids, attention_mask) of prompt + completion + EOS, left-padded → one reward per row: scoring the very
tokens the policy sampled, for a reward model that shares the policy's tokenizer (no decode and re-tokenise)."""
