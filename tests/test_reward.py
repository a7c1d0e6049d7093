"""Reward model: TRL's RewardTrainer from a tiny checkpoint learns a clear preference and saves a model that the
RL-side scorer reloads; held-out pairwise accuracy counts ties as half; the scorer truncates from the left."""

from __future__ import annotations

import math
import random

import pytest
from datasets import Dataset
from hydra.utils import instantiate

from components.reward import pairwise_accuracy, train_reward_model
from components.scoring import RewardScorer
from flows.config import compose_config
from tests.helpers import synthetic_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD, BAD = ["good", "happy", "very good"], ["bad", "sad", "quite bad"]


def clear_pairs(n: int, seed: int) -> Dataset:
    """Pairs whose chosen completion is made of positive words and whose rejected one of negative words, after
    the same random prompt from the synthetic corpus's vocabulary: a preference any reward model can learn."""
    rng = random.Random(seed)
    rows = []
    for prompt in synthetic_corpus(n, seed):
        filler = " ".join(rng.choice(["the", "cat", "dog", "mat", "log"]) for _ in range(rng.randint(0, 2)))
        rows.append({"prompt": prompt, "chosen": f" {filler} {rng.choice(GOOD)} {rng.choice(GOOD)}",
                     "rejected": f" {filler} {rng.choice(BAD)} {rng.choice(BAD)}"})  # fmt: skip
    return Dataset.from_list(rows)


class StubScorer:
    """A scorer with RewardScorer's `score` signature, reading each completion's score from a table."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.batch_sizes: list[int] = []

    def score(self, prompts: list[str], completions: list[str], batch_size: int) -> list[float]:
        assert len(prompts) == len(completions)
        self.batch_sizes.append(batch_size)
        return [self.table[c] for c in completions]


def test_pairwise_accuracy_counts_ties_as_half_and_averages_margins():
    scorer = StubScorer({"a": 2.0, "b": 1.0, "c": 0.0, "d": 3.0, "e": 5.0})
    pairs = Dataset.from_list([
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # win, margin +1
        {"prompt": "p", "chosen": "b", "rejected": "b"},  # tie: half, margin 0
        {"prompt": "p", "chosen": "c", "rejected": "d"},  # loss, margin -3
        {"prompt": "p", "chosen": "e", "rejected": "e"},  # tie: half, margin 0
    ])  # fmt: skip
    metrics = pairwise_accuracy(scorer, pairs, batch_size=3)
    assert metrics == {"reward/eval_accuracy": pytest.approx(0.5), "reward/eval_margin": pytest.approx(-0.5)}
    assert scorer.batch_sizes == [3, 3]
    assert pairwise_accuracy(scorer, pairs.select([1]), 3)["reward/eval_accuracy"] == 0.5


@pytest.fixture(scope="module")
def reward_run(tiny_checkpoint, tmp_path_factory):
    """A short RewardTrainer run (~5 s on one core) on clear pairs, with the YAML's RewardConfig as composed."""
    root = tmp_path_factory.mktemp("reward")
    cfg = compose_config(["reward.args.num_train_epochs=8", "reward.args.per_device_train_batch_size=16",
                          "reward.args.learning_rate=0.003", "reward.args.warmup_steps=0",
                          "reward.args.logging_steps=4"])  # fmt: skip
    args = instantiate(cfg["reward"]["args"], output_dir=str(root / "trainer"))
    pairs = clear_pairs(64, seed=0)
    logs: list[tuple[int, dict[str, float]]] = []
    summary = train_reward_model(tiny_checkpoint, pairs, args, root / "model", lambda s, m: logs.append((s, m)))
    return {"summary": summary, "logs": logs, "pairs": pairs, "out": str(root / "model")}


def test_training_returns_finite_metrics_and_logs_them(reward_run):
    summary = reward_run["summary"]
    assert summary["reward/steps"] == 32  # 64 pairs / 16 per step × 8 epochs
    for key in ("reward/train_loss", "reward/train_seconds", "reward/steps"):
        assert math.isfinite(summary[key]), key
    logged = {k for _, m in reward_run["logs"] for k in m}
    assert {"reward/loss", "reward/total_steps"} <= logged and all(k.startswith("reward/") for k in logged)


def test_saved_model_ranks_its_training_pairs(reward_run):
    """The saved reward model, reloaded the way RL and evaluation load it, prefers chosen over rejected on its
    training pairs and on new pairs of the same kind (trainer seeds 0-2: accuracy 1.0 on both, margin 5-6)."""
    trained = pairwise_accuracy(RewardScorer(reward_run["out"], "cpu", 96), reward_run["pairs"], 16)
    assert trained["reward/eval_accuracy"] > 0.9 and trained["reward/eval_margin"] > 0, trained
    held_out = pairwise_accuracy(RewardScorer(reward_run["out"], "cpu", 96), clear_pairs(32, seed=1), 16)
    assert held_out["reward/eval_accuracy"] > 0.8, held_out


def test_scorer_truncates_from_the_left_keeping_the_completion_and_eos(reward_run):
    """With `max_length`, texts that differ only in their beginning score the same: the end, where the
    completion and its EOS are, is kept."""
    scorer = RewardScorer(reward_run["out"], "cpu", max_length=5)  # <s> ▁log ▁very ▁happy </s>
    prompts = ["the cat sat on the mat and the dog ran under the log", "a big red dog sat under a small blue log"]
    a, b = scorer.score(prompts, [" very happy", " very happy"], batch_size=2)
    assert a == pytest.approx(b, abs=1e-5)
    full = RewardScorer(reward_run["out"], "cpu", max_length=None)
    assert full.score(prompts, [" very happy"] * 2, batch_size=2) != pytest.approx([a, b], abs=1e-5)
