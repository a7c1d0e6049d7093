"""Supervised fine-tuning with TRL's SFTTrainer on prompt/completion (or conversational) demonstrations."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from components.hooks import StepLogger
from components.modeling import count_parameters, load_causal_lm, load_tokenizer
from components.training import ForwardLogs, train_and_save


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
    return train_and_save(trainer, tokenizer, output_dir, "sft") | {"sft/n_parameters": float(count_parameters(model))}
