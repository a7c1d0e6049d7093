"""Held-out evaluation of a trained policy against the SFT model it started from.

Both models answer the same held-out prompts with the same sampling seed. The policy is judged by the proxy
(reward model) and, where the task has one, the gold reward; the gold win rate over SFT and the Monte-Carlo
KL(policy ‖ SFT) on the policy's own samples say whether it improved honestly or drifted.
"""

from __future__ import annotations

import torch

from components.generation import Rollout, SamplingSettings, sample, sequence_logprobs
from components.hooks import GoldFn
from components.modeling import load_causal_lm, load_tokenizer
from components.scoring import RewardScorer


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """Share of prompts where `ours` beats `theirs`, ties counting half."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)]
    return sum(wins) / len(wins)


def mean(values: list[float]) -> float:
    """Arithmetic mean of a non-empty list."""
    return sum(values) / len(values)


@torch.no_grad()
def kl_to_reference(policy, reference, rollout: Rollout, temperature: float, batch_size: int) -> list[float]:
    """Per-sequence sum over completion tokens of log π(y) − log π_ref(y): a sample estimate of KL(π ‖ π_ref)."""
    out: list[float] = []
    for start in range(0, rollout.input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        args = (rollout.input_ids[rows], rollout.attention_mask[rows], rollout.n_prompt,
                rollout.completion_mask[rows], temperature, False)
        diff = sequence_logprobs(policy, *args).logprobs - sequence_logprobs(reference, *args).logprobs
        out.extend(diff.sum(dim=1).tolist())
    return out


def compare_policies(
    policy_path: str, sft_path: str, prompts: list[str], settings: SamplingSettings, device: str,
    scorer: RewardScorer | None, gold_fn: GoldFn | None,
) -> tuple[dict[str, float], list[dict]]:
    """Sample from policy and SFT on `prompts`; return `eval/*` metrics and one table row per prompt."""
    tokenizer = load_tokenizer(policy_path)
    policy = load_causal_lm(policy_path).to(device).eval()
    sft = load_causal_lm(sft_path).to(device).eval()
    ours, base = sample(policy, tokenizer, prompts, settings), sample(sft, tokenizer, prompts, settings)
    kl = kl_to_reference(policy, sft, ours, settings.temperature, settings.batch_size)
    metrics = {
        "eval/kl_to_sft": mean(kl),
        "eval/mean_length": ours.lengths.float().mean().item(),
        "eval/mean_length_sft": base.lengths.float().mean().item(),
        "eval/eos_rate": ours.ended_with_eos.float().mean().item(),
        "eval/n_prompts": float(len(prompts)),
    }
    rows = [{"prompt": p, "policy": a, "sft": b} for p, a, b in zip(prompts, ours.texts, base.texts, strict=True)]
    for name, fn in (("proxy", scorer and (lambda p, c: scorer.score(p, c, settings.batch_size))), ("gold", gold_fn)):
        if fn is None:
            continue
        score, score_sft = fn(prompts, ours.texts), fn(prompts, base.texts)
        metrics[f"eval/{name}_reward_mean"] = mean(score)
        metrics[f"eval/{name}_reward_mean_sft"] = mean(score_sft)
        metrics[f"eval/{name}_win_rate_vs_sft"] = win_rate(score, score_sft)
        for row, a, b in zip(rows, score, score_sft, strict=True):
            row[f"{name}_policy"], row[f"{name}_sft"] = a, b
    if "eval/gold_win_rate_vs_sft" in metrics:
        metrics["eval/win_rate_vs_sft"] = metrics["eval/gold_win_rate_vs_sft"]
    return metrics, rows
