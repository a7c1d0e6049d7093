"""Direct preference optimisation with TRL's DPOTrainer: the SFT model learns from ranked pairs, no reward model.

The policy starts from the SFT checkpoint and the frozen reference IS the SFT checkpoint: both are loaded from
`sft_path`, and the reference is passed explicitly rather than left to TRL (TRL 1.16 rebuilds it from the
policy's `config._name_or_path`, which is empty for a model built in memory). DPOTrainer patches a fused LM head
onto the policy's `forward` (an instance attribute, not saved); the saved checkpoint is a plain causal LM. With LoRA
(`lora`) there is no second model: the reference is the policy with its adapters off.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from components.hooks import StepLogger
from components.modeling import count_trainable, load_causal_lm, load_tokenizer
from components.training import ForwardLogs, LoraSettings, last_logged, lora_config, train_and_save

#: Summary name → the key DPOTrainer logs it under (averaged over the last logging window).
LAST_WINDOW_METRICS = {
    "dpo/rewards_margin": "rewards/margins",
    "dpo/accuracy": "rewards/accuracies",
    "dpo/rewards_chosen": "rewards/chosen",
    "dpo/rewards_rejected": "rewards/rejected",
    "dpo/loss": "loss",
}


def train_dpo(
    sft_path: str, train: Dataset, args: DPOConfig, output_dir: str | Path, on_log: StepLogger | None = None,
    lora: LoraSettings | None = None,
) -> dict[str, float]:
    """Train the SFT checkpoint with DPO on `prompt`/`chosen`/`rejected` pairs; save model + tokenizer.

    Returns the last logging window's implicit-reward margin and accuracy (share of pairs whose chosen
    completion gains more log-probability over the reference than the rejected one), its loss, the mean loss
    over the run, the step count and the training seconds. With `lora` only adapters train and the reference is
    the same model with its adapters off (no second copy); the checkpoint is saved merged.
    """
    tokenizer = load_tokenizer(sft_path)
    policy = load_causal_lm(sft_path)
    trainer = DPOTrainer(
        model=policy,
        ref_model=None if lora else load_causal_lm(sft_path),
        args=args,
        train_dataset=train.select_columns(["prompt", "chosen", "rejected"]),
        processing_class=tokenizer,
        callbacks=[ForwardLogs("dpo", on_log)],
        peft_config=lora_config(lora, "CAUSAL_LM"),
    )
    trained = {"dpo/n_trainable": float(count_trainable(trainer.model))} if lora else {}
    run = train_and_save(trainer, tokenizer, output_dir, "dpo", lambda: load_causal_lm(sft_path))
    history = trainer.state.log_history
    return {name: last_logged(history, key) for name, key in LAST_WINDOW_METRICS.items()} | run | trained
