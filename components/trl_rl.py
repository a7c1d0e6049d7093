"""Online RL with TRL's maintained trainers, beside our own PPO: RLOO and GRPO against a plain reward callable.

Both sample `num_generations` completions per prompt and use the group as the baseline (RLOO: leave-one-out
mean; GRPO: group mean, scaled by the group std), so neither needs a value head. The policy starts from the SFT
checkpoint; with `beta > 0` TRL loads a frozen reference from the policy's `config._name_or_path`, i.e. the SFT
checkpoint again (RLOO folds the summed per-token log-ratio into the reward, GRPO adds a k3 KL term to the loss).

Pitfall fixed here: TRL samples with `generate` (position ids from the attention mask) but scores log-probs
with a plain forward on the left-padded batch, where models with absolute position embeddings (GPT-2) then
count pads as positions: on the embedded task ~98% of rows are padded and a completion's log-probability moved
by ~2.5 nats. `positions_from_mask` makes both the policy and the reference derive positions from the mask.

The reward is any `reward_fn(prompts, completions) -> scores` (the flow passes the trained reward model's
scorer). TRL hands reward functions completions decoded WITHOUT special tokens, so an unfinished completion
looks finished to a scorer that appends EOS; `missing_eos_penalty` restores that signal from the token ids.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, Trainer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from components.hooks import RewardFn, StepLogger
from components.modeling import load_causal_lm, load_tokenizer
from components.training import ForwardLogs, last_logged, train_and_save

#: Summary name (after the `<algo>/` prefix) → the key both trainers log it under, averaged over a logging window.
LAST_WINDOW_METRICS = {
    "mean_reward": "reward_model_score",  # reward_fn's raw score (as ppo/mean_reward), logged by the adapter
    "mean_score": "reward",  # what was optimised: the score minus the missing-EOS penalty (as ppo/mean_score)
    "reward_std": "reward_std",
    "kl": "kl",  # PER-TOKEN KL to the reference (RLOO: mean log-ratio, GRPO: k3); ppo/kl is per sequence
    "entropy": "entropy",
    "mean_length": "completions/mean_length",  # completion tokens, EOS included
    "clipped_ratio": "completions/clipped_ratio",  # share of completions cut at max_completion_length
}


def as_trl_reward(reward_fn: RewardFn, eos_token_ids: Sequence[int], missing_eos_penalty: float | None) -> Callable:
    """Adapt `reward_fn(prompts, completions)` to TRL's custom reward signature (keyword arguments).

    TRL calls it with `prompts`, `completions` (decoded text), `completion_ids` (generated ids, EOS included
    when the completion ended) and extra columns; `missing_eos_penalty` (or None) is subtracted from the score
    of every completion that did not end with an EOS id. The raw scores' mean goes to TRL's `log_metric` as
    `reward_model_score`. The function's name labels TRL's per-function metrics (`rewards/reward_model/mean`).
    """
    eos = set(eos_token_ids)

    def reward_model(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **kwargs: Any):
        """One score per completion, as TRL calls custom reward functions."""
        if not all(isinstance(x, str) for x in [*prompts, *completions]):
            raise TypeError("reward_fn scores plain-text prompts; conversational (message list) prompts are not wired")
        scores = [float(s) for s in reward_fn(list(prompts), list(completions))]
        if callable(kwargs.get("log_metric")) and scores:
            kwargs["log_metric"]("reward_model_score", sum(scores) / len(scores))
        if missing_eos_penalty:
            scores = [
                s - missing_eos_penalty * (not ids or ids[-1] not in eos)
                for s, ids in zip(scores, completion_ids, strict=True)
            ]
        return scores

    return reward_model


def positions_from_mask(model: PreTrainedModel) -> None:
    """Make `model`'s backbone derive position ids from the attention mask when a caller passes none.

    This is what `generate` does under left padding; TRL's log-prob forwards pass only the mask. Calls that
    give position ids (generation) or carry a KV cache are unchanged, as is an unpadded batch (cumsum − 1 is
    arange). Patches this instance only; nothing of it is saved. Models without a separate backbone are skipped.
    """
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        return
    original = body.forward

    @functools.wraps(original)
    def forward(*args: Any, attention_mask: torch.Tensor | None = None, position_ids: Any = None, **kwargs: Any):
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            if kwargs.get("past_key_values") is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return original(*args, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    body.forward = forward


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion in TRL's sampling: the generation config's EOS ids plus the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({*ids, tokenizer.eos_token_id} - {None})


def _train(
    trainer_cls: type[Trainer],
    algo: str,
    sft_path: str,
    prompts: Dataset,
    reward_fn: RewardFn,
    args: RLOOConfig | GRPOConfig,
    missing_eos_penalty: float | None,
    output_dir: str | Path,
    on_log: StepLogger | None,
) -> dict[str, float]:
    """Shared body of `train_rloo` / `train_grpo`: build the trainer, train, save, summarise."""
    tokenizer = load_tokenizer(sft_path)
    policy = load_causal_lm(sft_path)  # its _name_or_path is sft_path: TRL builds the KL reference from it
    trainer = trainer_cls(
        model=policy,
        reward_funcs=as_trl_reward(reward_fn, _eos_ids(policy, tokenizer), missing_eos_penalty),
        args=args,
        train_dataset=prompts.select_columns(["prompt"]),
        processing_class=tokenizer,
        callbacks=[ForwardLogs(algo, on_log)],
    )
    for model in (policy, trainer.ref_model):  # ref_model is None when beta == 0
        if model is not None:
            positions_from_mask(model)
    run = train_and_save(trainer, tokenizer, output_dir, algo)
    history = trainer.state.log_history
    return {f"{algo}/{name}": last_logged(history, key) for name, key in LAST_WINDOW_METRICS.items()} | run


def train_rloo(
    sft_path: str,
    prompts: Dataset,
    reward_fn: RewardFn,
    args: RLOOConfig,
    missing_eos_penalty: float | None,
    output_dir: str | Path,
    on_log: StepLogger | None = None,
) -> dict[str, float]:
    """REINFORCE Leave-One-Out (Ahmadian et al., 2024) from the SFT checkpoint on a `prompt` column; save it.

    Returns `rloo/mean_reward`, `rloo/kl` and the other last-window metrics, the mean loss, steps and seconds.
    """
    return _train(RLOOTrainer, "rloo", sft_path, prompts, reward_fn, args, missing_eos_penalty, output_dir, on_log)


def train_grpo(
    sft_path: str,
    prompts: Dataset,
    reward_fn: RewardFn,
    args: GRPOConfig,
    missing_eos_penalty: float | None,
    output_dir: str | Path,
    on_log: StepLogger | None = None,
) -> dict[str, float]:
    """Group Relative Policy Optimisation (Shao et al., 2024) from the SFT checkpoint on a `prompt` column; save it.

    Returns `grpo/mean_reward`, `grpo/kl` and the other last-window metrics, the mean loss, steps and seconds.
    """
    return _train(GRPOTrainer, "grpo", sft_path, prompts, reward_fn, args, missing_eos_penalty, output_dir, on_log)
