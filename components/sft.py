"""Supervised fine-tuning with TRL's SFTTrainer on prompt/completion (or conversational) demonstrations."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from components.modeling import load_causal_lm, load_tokenizer
from components.training import ForwardLogs, StepLogger, quiet


def train_sft(
    model_path: str, train: Dataset, args: SFTConfig, output_dir: str | Path, on_log: StepLogger | None = None
) -> dict[str, float]:
    """Fine-tune `model_path` on `train`, save model + tokenizer to `output_dir`, return summary metrics."""
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[ForwardLogs("sft", on_log)],
    )
    result = quiet(trainer).train()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return {
        "sft/train_loss": float(result.training_loss),
        "sft/train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "sft/steps": float(result.global_step),
    }
