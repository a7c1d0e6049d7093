"""Reward model: TRL's RewardTrainer from a tiny checkpoint learns a clear preference and saves a model that the
RL-side scorer reloads; held-out pairwise accuracy counts ties as half; the scorer truncates from the left."""

from __future__ import annotations

import math
import random

import pytest
import torch
from datasets import Dataset
from hydra.utils import instantiate

from components.reward import HeadOf, LengthBuckets, RewardConditioning, pairwise_accuracy, train_reward_model
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


def test_scorer_batches_by_length_and_returns_scores_in_the_pairs_order(reward_run):
    """Scored in batches (taken in order of length), every pair gets the score it gets alone."""
    scorer = RewardScorer(reward_run["out"], "cpu", None)
    pairs = clear_pairs(9, seed=3)
    prompts, completions = list(pairs["prompt"]), [c + " the mat" * (i % 4) for i, c in enumerate(pairs["chosen"])]
    alone = [scorer.score([p], [c], 1)[0] for p, c in zip(prompts, completions, strict=True)]
    assert scorer.score(prompts, completions, 4) == pytest.approx(alone, abs=1e-5)
    assert len(set(alone)) == len(alone)  # distinct scores, so a mix-up of the order would show
    assert scorer.score([], [], 4) == [] and scorer.score_heads([], [], 4) == []


def padded_batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`texts` right-padded into one batch, as TRL's preference collator lays them out."""
    enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_length_buckets_give_one_forwards_logits_and_gradients(tiny_checkpoint):
    """Rows of many lengths run as 3 forwards over length groups: the logits (in the batch's order) and the
    gradients of their sum are those of one forward over the whole padded batch; under HeadOf too."""
    from components.modeling import load_reward_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    model = load_reward_model(tiny_checkpoint, heads=["a", "b"])
    model.config.pad_token_id = tokenizer.pad_token_id
    texts = [" ".join(["the cat sat"] * n) for n in (1, 6, 2, 9, 3, 1, 5, 2)]  # 4 pairs: chosen rows, then rejected
    ids, mask = padded_batch(tokenizer, texts)
    grads = []
    for forward in (model, LengthBuckets(model, 3)):
        model.zero_grad()
        logits = HeadOf(forward, torch.tensor([0, 1, 1, 0]))(input_ids=ids, attention_mask=mask).logits
        logits.sum().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (one, one_grads), (buckets, bucket_grads) = grads
    assert one.shape == buckets.shape == (8, 1) and torch.allclose(one, buckets, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one_grads, bucket_grads, strict=True))


def test_training_in_length_buckets_follows_the_same_losses(tmp_path, tiny_checkpoint, reward_run):
    """`reward_run` again with `length_buckets=4`: the same logged losses, step for step, up to float rounding."""
    cfg = compose_config(["reward.args.num_train_epochs=8", "reward.args.per_device_train_batch_size=16",
                          "reward.args.learning_rate=0.003", "reward.args.warmup_steps=0",
                          "reward.args.logging_steps=4"])  # as reward_run
    args = instantiate(cfg["reward"]["args"], output_dir=str(tmp_path / "trainer"))
    logs: list[tuple[int, dict[str, float]]] = []
    train_reward_model(tiny_checkpoint, reward_run["pairs"], args, tmp_path / "model", lambda s, m: logs.append((s, m)),
                       length_buckets=4)
    losses = [(step, m["reward/loss"]) for step, m in logs if "reward/loss" in m]
    expected = [(step, m["reward/loss"]) for step, m in reward_run["logs"] if "reward/loss" in m]
    assert len(losses) == len(expected) >= 4
    assert [s for s, _ in losses] == [s for s, _ in expected]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-3, abs=1e-4)


# ------------------------------------------------------------------------------- annotator-conditioned reward
def opposed_pairs(n: int, seed: int) -> Dataset:
    """Clear pairs labelled by two annotators with opposite tastes: `fan` prefers the positive side, `grump` the
    negative one; a pooled model cannot serve both, a model with one head per annotator can."""
    rows = clear_pairs(n, seed).to_list()
    for i, row in enumerate(rows):
        if i % 2:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["annotator"] = "grump" if i % 2 else "fan"
    return Dataset.from_list(rows)


def test_head_of_scores_each_pair_on_its_annotators_head():
    """A batch is chosen rows then rejected rows; each pair's two rows are read on the head of its annotator."""

    class Model:
        def __call__(self, **inputs):
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=torch.arange(12.0).reshape(4, 3))  # 2 pairs, 3 heads

    picked = HeadOf(Model(), torch.tensor([2, 0]))(input_ids=None).logits
    assert picked.shape == (4, 1) and picked.squeeze(-1).tolist() == [2.0, 3.0, 8.0, 9.0]


def test_mix_weights_are_normalised_per_head_and_checked():
    heads = ["concise", "critic", "enthusiast"]
    assert RewardConditioning("per_annotator").weights(heads) == pytest.approx([1 / 3] * 3)
    assert RewardConditioning("per_annotator", {"enthusiast": 3, "concise": 1}).weights(heads) == [0.25, 0.0, 0.75]
    with pytest.raises(ValueError, match=r"^mix = .*'fans'.*label no pairs"):
        RewardConditioning("per_annotator", {"fans": 1}).weights(heads)
    for bad in ({"critic": -1}, {"critic": 0}, {"critic": "a lot"}, [1, 2]):
        with pytest.raises(ValueError, match=r"^mix = .* weights >= 0"):
            RewardConditioning("per_annotator", bad)
    with pytest.raises(ValueError, match=r"^mix = .*reward\.conditioning=per_annotator"):
        RewardConditioning("pooled", {"critic": 1})
    with pytest.raises(ValueError, match=r"^conditioning = 'per_profile' is invalid: use one of pooled, per_annot"):
        RewardConditioning("per_profile")


def test_per_profile_accuracy_uses_each_profiles_head():
    """Per profile: the pairs it labelled, scored by its own head; overall: the mixed scalar RL optimises."""

    class TwoHeads(StubScorer):
        heads, mix = ["fan", "grump"], [0.5, 0.5]

        def score_heads(self, prompts, completions, batch_size):
            return [[self.table[c], -self.table[c]] for c in completions]

    pairs = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "fan"},
                               {"prompt": "p", "chosen": "b", "rejected": "a", "annotator": "grump"},
                               {"prompt": "p", "chosen": "b", "rejected": "a", "annotator": "fan"}])  # fmt: skip
    metrics = pairwise_accuracy(TwoHeads({"a": 2.0, "b": 1.0}), pairs, 4)
    assert metrics["reward/eval_accuracy/fan"] == 0.5 and metrics["reward/eval_accuracy/grump"] == 1.0
    assert metrics["reward/eval_accuracy_own_annotator"] == pytest.approx(2 / 3)
    assert metrics["reward/eval_accuracy"] == 0.5  # the equal mix scores every text 0: all ties
    pooled = pairwise_accuracy(StubScorer({"a": 2.0, "b": 1.0}), pairs, 4)
    assert pooled["reward/eval_accuracy/fan"] == 0.5 and pooled["reward/eval_accuracy/grump"] == 0.0


@pytest.fixture(scope="module")
def conditioned_run(tiny_checkpoint, tmp_path_factory):
    """RewardTrainer runs on pairs from two opposed annotators: one head per annotator, and pooled."""
    root = tmp_path_factory.mktemp("conditioned")
    cfg = compose_config(["reward.args.num_train_epochs=8", "reward.args.per_device_train_batch_size=16",
                          "reward.args.learning_rate=0.003", "reward.args.warmup_steps=0"])  # fmt: skip
    pairs = opposed_pairs(64, seed=0)
    runs = {"per_annotator": (pairs, {"heads": ["fan", "grump"], "mix": [1.0, 0.0]}),
            "pooled": (pairs.remove_columns("annotator"), {})}
    for name, (train, conditioning) in runs.items():
        args = instantiate(cfg["reward"]["args"], output_dir=str(root / name / "trainer"))
        train_reward_model(tiny_checkpoint, train, args, root / name / "model", **conditioning)
    return {"root": root, "held_out": opposed_pairs(32, seed=1)}


def test_conditioned_model_learns_each_annotators_taste_and_scores_by_its_mix(conditioned_run):
    scorer = RewardScorer(str(conditioned_run["root"] / "per_annotator" / "model"), "cpu", None)
    assert scorer.heads == ["fan", "grump"] and scorer.mix == [1.0, 0.0]
    assert scorer.model.config.id2label == {0: "fan", 1: "grump"}
    metrics = pairwise_accuracy(scorer, conditioned_run["held_out"], 16)
    assert metrics["reward/eval_accuracy/fan"] > 0.8 and metrics["reward/eval_accuracy/grump"] > 0.8, metrics
    assert metrics["reward/eval_accuracy"] == pytest.approx(0.5, abs=0.2)  # the mix serves the fan only
    heads = scorer.score_heads(["the cat"], [" very good"], 1)[0]
    assert scorer.score(["the cat"], [" very good"], 1) == pytest.approx([heads[0]], abs=1e-5)
    tokens = scorer.tokenizer(["the cat very good" + scorer.tokenizer.eos_token], return_tensors="pt")
    assert scorer.score_ids(tokens.input_ids, tokens.attention_mask, 1) == pytest.approx([heads[0]], abs=1e-4)
    pooled = pairwise_accuracy(RewardScorer(str(conditioned_run["root"] / "pooled" / "model"), "cpu", None),
                               conditioned_run["held_out"], 16)
    assert pooled["reward/eval_accuracy_own_annotator"] < metrics["reward/eval_accuracy_own_annotator"], pooled


def test_weight_average_loads_the_moving_average_of_the_steps_at_the_end():
    """After steps with weights 1, 3, 5 and decay 0.5 the average is 1, then 2, then 3.5 (it starts from the first
    step's weights); training's end copies it into the model that gets saved."""
    from components.training import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(0.5)
    for value in (1.0, 3.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.on_step_end(None, None, None, model=model)
    assert model.weight.item() == 5.0  # the live weights train on untouched
    average.on_train_end(None, None, None, model=model)
    assert model.weight.item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="decay = 1.0 is invalid"):
        WeightAverage(1.0)


def test_reward_model_saved_with_ema_is_the_average_not_the_last_step(tmp_path, tiny_checkpoint, reward_run):
    """`reward_run`'s training again with `ema_decay` saves different weights, and the averaged model still ranks
    its training pairs (the average of good steps is a good model)."""
    cfg = compose_config(["reward.args.num_train_epochs=8", "reward.args.per_device_train_batch_size=16",
                          "reward.args.learning_rate=0.003", "reward.args.warmup_steps=0"])  # as reward_run
    args = instantiate(cfg["reward"]["args"], output_dir=str(tmp_path / "trainer"))
    train_reward_model(tiny_checkpoint, reward_run["pairs"], args, tmp_path / "model", ema_decay=0.8)
    last, ema = (RewardScorer(out, "cpu", None) for out in (reward_run["out"], str(tmp_path / "model")))
    assert not torch.allclose(*(dict(m.model.named_parameters())["score.weight"] for m in (last, ema)))
    assert pairwise_accuracy(ema, reward_run["pairs"], 32)["reward/eval_accuracy"] > 0.9


def test_ema_is_not_applied_where_accelerate_shards_the_parameters(caplog):
    """FSDP and ZeRO-3 leave no process a whole weight to average: the reward stage then trains without the average
    (and warns); every other launch option keeps `reward.ema_decay`."""
    from flows.bodies import _ema_decay
    from flows.launch import shards_parameters

    for option, sharded in (("none", False), ("cpu_ddp", False), ("ddp", False), ("deepspeed_zero2", False),
                            ("deepspeed_zero3", True), ("fsdp", True)):  # fmt: skip
        accelerate = compose_config([f"accelerate={option}"])["accelerate"]
        assert shards_parameters(accelerate) is sharded, option
        spec = {"config": {"reward": {"ema_decay": 0.98}, "accelerate": accelerate}}
        with caplog.at_level("WARNING", logger="alignflow"):
            assert _ema_decay(spec) == (None if sharded else 0.98), option
    assert "reward.ema_decay=0.98 is not applied under accelerate=fsdp" in caplog.text
