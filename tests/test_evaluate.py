"""Held-out evaluation (components/evaluate.py): win rates with ties as half, the sampled KL to the reference,
and compare_policies on a policy that is its own SFT model (every comparison a tie, KL zero)."""

from __future__ import annotations

import math

import pytest
import torch

from components.annotators import AnnotatorProfile
from components.evaluate import (
    compare_policies,
    kl_to_reference,
    mean,
    profile_metrics,
    win_rate,
    win_rate_stderr,
    worst_served,
)
from components.generation import SamplingSettings, sample_completions
from components.modeling import load_causal_lm, load_tokenizer
from components.scoring import RewardScorer

PROMPTS = ["the cat", "a dog sat on the", "very", "the big red dog ran under a small blue log and", "good", "sad"]

pytestmark = pytest.mark.usefixtures("one_thread")


def gold(prompts: list[str], completions: list[str]) -> list[float]:
    """A deterministic gold reward: positive words minus negative ones, a little credit for length."""
    return [c.count("good") + c.count("happy") - c.count("bad") + 0.01 * len(c) for c in completions]


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(0.5)
    assert win_rate([1.0, 1.0], [0.0, 0.0]) == 1.0 and win_rate([0.0], [1.0]) == 0.0
    assert win_rate([0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3]) == 0.5
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])


def test_mean():
    assert mean([1.0, 2.0, 6.0]) == 3.0 and mean([-0.5]) == -0.5


def test_win_rate_stderr_is_the_outcomes_standard_error():
    # outcomes 1, 0, 0.5, 1: mean 0.625, squared deviations sum to 0.6875; sample variance 0.6875 / 3, over n = 4
    assert win_rate_stderr([2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 1.0]) == pytest.approx((0.6875 / 3 / 4) ** 0.5)
    wins = [1.0] * 80 + [0.0] * 20  # wins and losses only: p(1 - p) / (n - 1)
    assert win_rate_stderr(wins, [0.5] * 100) == pytest.approx((0.8 * 0.2 / 99) ** 0.5)
    assert win_rate_stderr([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == 0.0  # unanimous prompts: no spread
    with pytest.raises(ValueError, match="two prompts"):
        win_rate_stderr([1.0], [0.0])


def test_kl_of_a_model_to_itself_is_zero_and_to_another_positive(tiny_checkpoint):
    tokenizer, model = load_tokenizer(tiny_checkpoint), load_causal_lm(tiny_checkpoint).eval()
    rollout = sample_completions(model, tokenizer, PROMPTS, 8, 1.0, 3, generator_seed=0)
    same = kl_to_reference(model, model, rollout, temperature=1.0, batch_size=4)
    assert len(same) == len(PROMPTS) and same == pytest.approx([0.0] * len(PROMPTS), abs=1e-5)

    policy = load_causal_lm(tiny_checkpoint).eval()  # the same model with a strong bias towards one word
    favourite = tokenizer.convert_tokens_to_ids("▁good")
    assert favourite != tokenizer.unk_token_id
    bias = torch.zeros(len(tokenizer))
    bias[favourite] = 5.0
    policy.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    drifted = sample_completions(policy, tokenizer, PROMPTS, 8, 1.0, 3, generator_seed=0)
    kl = kl_to_reference(policy, model, drifted, temperature=1.0, batch_size=4)
    assert mean(kl) > 1.0, kl  # mostly "good", which the reference gives ~1/200
    rebatched = kl_to_reference(policy, model, drifted, temperature=1.0, batch_size=6)
    assert rebatched == pytest.approx(kl, abs=1e-4)  # batch size is memory, not results


def test_compare_policies_of_a_model_with_itself_is_all_ties(tiny_checkpoint):
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, batch_size=4, seed=0)
    scorer = RewardScorer(tiny_checkpoint, "cpu", None)  # a random scalar head: any deterministic scorer works
    metrics, rows = compare_policies(tiny_checkpoint, tiny_checkpoint, PROMPTS, settings, "cpu", scorer, gold)
    assert metrics["eval/gold_win_rate_vs_sft"] == 0.5 and metrics["eval/proxy_win_rate_vs_sft"] == 0.5
    assert metrics["eval/win_rate_vs_sft"] == metrics["eval/gold_win_rate_vs_sft"]
    assert metrics["eval/gold_win_rate_vs_sft_stderr"] == 0.0 == metrics["eval/proxy_win_rate_vs_sft_stderr"]  # ties
    assert metrics["eval/win_rate_vs_sft_stderr"] == metrics["eval/gold_win_rate_vs_sft_stderr"]
    assert metrics["eval/kl_to_sft"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["eval/gold_reward_mean"] == metrics["eval/gold_reward_mean_sft"]
    assert metrics["eval/mean_length"] == metrics["eval/mean_length_sft"] > 0
    assert 0.0 <= metrics["eval/eos_rate"] <= 1.0 and metrics["eval/n_prompts"] == len(PROMPTS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:
        assert row["policy"] == row["sft"] and row["gold_policy"] == row["gold_sft"]
        assert row["proxy_policy"] == row["proxy_sft"]


def test_compare_policies_without_scorers_reports_only_sampling_metrics(tiny_checkpoint):
    settings = SamplingSettings(max_new_tokens=4, temperature=1.0, batch_size=6, seed=1)
    metrics, rows = compare_policies(tiny_checkpoint, tiny_checkpoint, PROMPTS[:2], settings, "cpu", None, None)
    assert set(metrics) == {"eval/kl_to_sft", "eval/mean_length", "eval/mean_length_sft", "eval/eos_rate",
                            "eval/n_prompts"}  # fmt: skip
    assert set(rows[0]) == {"prompt", "policy", "sft"}


def test_profile_metrics_judge_the_policy_by_each_profiles_utility():
    """Stuffed praise beats a good review for the enthusiast (no stuffing penalty) and loses for the critic: the
    policy serves the critic worst, and the profiles disagree on every prompt where the answers differ."""
    good, stuffed = " the screen is great. the battery is lovely.", " great excellent lovely superb perfect amazing"
    enthusiast = AnnotatorProfile("enthusiast", weights={"sentiment": 2.0, "stuffing_penalty": 0.0})
    critic = AnnotatorProfile("critic", weights={"sentiment": 0.25, "stuffing_penalty": 3.0})
    metrics = profile_metrics([enthusiast, critic], [stuffed, stuffed, good], [good, good, good])
    assert metrics["eval/gold_win_rate_vs_sft/enthusiast"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert metrics["eval/gold_win_rate_vs_sft/critic"] == pytest.approx(0.5 / 3)
    assert metrics["eval/worst_profile_win_rate"] == metrics["eval/gold_win_rate_vs_sft/critic"]
    assert metrics["eval/profile_disagreement"] == pytest.approx(2 / 3)
    assert worst_served(metrics) == "critic" and worst_served({"eval/win_rate_vs_sft": 0.4}) is None
    tie = {"eval/gold_win_rate_vs_sft/enthusiast": 0.5, "eval/gold_win_rate_vs_sft/critic": 0.5}
    assert worst_served(tie) == worst_served(dict(reversed(tie.items()))) == "critic"  # by name, not by order
    assert profile_metrics([], [good], [stuffed]) == {}


def test_compare_policies_with_profiles_of_a_model_with_itself_ties_for_every_profile(tiny_checkpoint):
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, batch_size=6, seed=2)
    profiles = [AnnotatorProfile("a"), AnnotatorProfile("b", per_word=0.5)]
    metrics, _ = compare_policies(tiny_checkpoint, tiny_checkpoint, PROMPTS, settings, "cpu", None, gold, profiles)
    assert metrics["eval/gold_win_rate_vs_sft/a"] == metrics["eval/gold_win_rate_vs_sft/b"] == 0.5
    assert metrics["eval/profile_disagreement"] == 0.0
