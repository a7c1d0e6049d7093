"""Reward model: TRL's RewardTrainer (Bradley–Terry loss) on ranked pairs, judged on held-out pairs.

Held-out accuracy is measured with the same scorer RL uses (prompt + completion + EOS), so the number reported
is the accuracy of the reward the policy actually optimises.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed
from trl import RewardConfig, RewardTrainer

from components.hooks import StepLogger
from components.modeling import count_trainable, load_reward_model, load_tokenizer
from components.scoring import RewardScorer
from components.training import ForwardLogs, LoraSettings, lora_config, train_and_save


def train_reward_model(
    init_path: str, train: Dataset, args: RewardConfig, output_dir: str | Path, on_log: StepLogger | None = None,
    lora: LoraSettings | None = None,
) -> dict[str, float]:
    """Train a scalar-head reward model from `init_path` on preference pairs; save it to `output_dir`.

    With `lora` the body trains low-rank adapters and the new head trains in full; the checkpoint is saved merged."""
    tokenizer = load_tokenizer(init_path)
    trainer = RewardTrainer(
        model=_reward_model(init_path, tokenizer, args.seed),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[ForwardLogs("reward", on_log)],
        peft_config=lora_config(lora, "SEQ_CLS"),
    )
    trained = {"reward/n_trainable": float(count_trainable(trainer.model))} if lora else {}
    base = partial(_reward_model, init_path, tokenizer, args.seed)  # what LoRA merges into
    return train_and_save(trainer, tokenizer, output_dir, "reward", base) | trained


def _reward_model(init_path: str, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """The reward model before training: `init_path`'s body with a new scalar head, padding like `tokenizer`."""
    set_seed(seed)  # the new scalar head is drawn from the RNG: the same seed gives the same model
    model = load_reward_model(init_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


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
