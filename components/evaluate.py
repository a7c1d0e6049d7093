"""Held-out evaluation of a trained policy against the SFT model it started from.

Both models answer the same held-out prompts with the same sampling seed. The policy is judged by the proxy
(reward model) and, where the task has one, the gold reward; the gold win rate over SFT and the Monte-Carlo
KL(policy ‖ SFT) on the policy's own samples say whether it improved honestly or drifted. Where annotator profiles
labelled the data (components/annotators.py), each profile's utility is its own gold: the policy is judged per
profile, with the profiles' disagreement and the profile it serves worst.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from components.annotators import PROFILE_WIN_RATE, AnnotatorProfile, disagreement, worst_served  # noqa: F401
from components.generation import Rollout, SamplingSettings, sample, sequence_logprobs
from components.hooks import GoldFn
from components.modeling import load_causal_lm, load_tokenizer
from components.scoring import RewardScorer
from components.stats import STDERR, win_rate, win_rate_stderr


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
    scorer: RewardScorer | None, gold_fn: GoldFn | None, profiles: Sequence[AnnotatorProfile] = (),
) -> tuple[dict[str, float], list[dict]]:
    """Sample from policy and SFT on `prompts`; return `eval/*` metrics and one table row per prompt (with
    `profiles`, also each profile's gold win rate: see `profile_metrics`)."""
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
        if len(prompts) > 1:
            metrics[f"eval/{name}_win_rate_vs_sft{STDERR}"] = win_rate_stderr(score, score_sft)
        for row, a, b in zip(rows, score, score_sft, strict=True):
            row[f"{name}_policy"], row[f"{name}_sft"] = a, b
    for suffix in ("", STDERR):
        if f"eval/gold_win_rate_vs_sft{suffix}" in metrics:
            metrics[f"eval/win_rate_vs_sft{suffix}"] = metrics[f"eval/gold_win_rate_vs_sft{suffix}"]
    return metrics | profile_metrics(profiles, ours.texts, base.texts), rows


def profile_metrics(profiles: Sequence[AnnotatorProfile], policy: list[str], sft: list[str]) -> dict[str, float]:
    """How the policy's answers serve each profile (its utility is its gold): the win rate over SFT's answers to the
    same prompts (`eval/gold_win_rate_vs_sft/<name>`) and the mean utility; the worst of those win rates
    (`eval/worst_profile_win_rate`); and `eval/profile_disagreement`, the share of prompts on which the profiles
    do not all prefer the same of the two answers. Nothing without profiles."""
    if not profiles:
        return {}
    metrics: dict[str, float] = {}
    for profile in profiles:
        ours, theirs = [profile.utility(t) for t in policy], [profile.utility(t) for t in sft]
        metrics[PROFILE_WIN_RATE + profile.name] = win_rate(ours, theirs)
        metrics[f"eval/profile_utility_mean/{profile.name}"] = mean(ours)
        metrics[f"eval/profile_utility_mean_sft/{profile.name}"] = mean(theirs)
    metrics["eval/worst_profile_win_rate"] = min(metrics[PROFILE_WIN_RATE + p.name] for p in profiles)
    metrics["eval/profile_disagreement"] = disagreement(profiles, policy, sft)
    return metrics
