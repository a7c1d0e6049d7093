"""Reward model: TRL's RewardTrainer (Bradley–Terry loss) on ranked pairs, judged on held-out pairs.

Held-out accuracy is measured with the same scorer RL uses (prompt + completion + EOS), so the number reported
is the accuracy of the reward the policy actually optimises.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from components.hooks import StepLogger
from components.modeling import load_reward_model, load_tokenizer
from components.scoring import RewardScorer
from components.training import ForwardLogs, train_and_save


def train_reward_model(
    init_path: str, train: Dataset, args: RewardConfig, output_dir: str | Path, on_log: StepLogger | None = None
) -> dict[str, float]:
    """Train a scalar-head reward model from `init_path` on preference pairs; save it to `output_dir`."""
    tokenizer = load_tokenizer(init_path)
    set_seed(args.seed)  # the new scalar head is drawn from the RNG: the same seed gives the same model
    model = load_reward_model(init_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[ForwardLogs("reward", on_log)],
    )
    return train_and_save(trainer, tokenizer, output_dir, "reward")


def pairwise_accuracy(scorer: RewardScorer, pairs: Dataset, batch_size: int) -> dict[str, float]:
    """Share of held-out pairs where the reward model scores `chosen` above `rejected` (ties count half)."""
    chosen = scorer.score(list(pairs["prompt"]), list(pairs["chosen"]), batch_size)
    rejected = scorer.score(list(pairs["prompt"]), list(pairs["rejected"]), batch_size)
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)]
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "reward/eval_accuracy": sum(wins) / len(wins),
        "reward/eval_margin": sum(margins) / len(margins),
    }
