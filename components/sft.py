"""Supervised fine-tuning with TRL's SFTTrainer on prompt/completion (or conversational) demonstrations."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from components.hooks import StepLogger
from components.modeling import count_parameters, count_trainable, load_causal_lm, load_tokenizer
from components.training import ForwardLogs, LoraSettings, lora_config, train_and_save


def train_sft(
    model_path: str, train: Dataset, args: SFTConfig, output_dir: str | Path, on_log: StepLogger | None = None,
    lora: LoraSettings | None = None,
) -> dict[str, float]:
    """Fine-tune `model_path` on `train`, save model + tokenizer to `output_dir`, return summary metrics.

    With `lora` only low-rank adapters train (PEFT); the saved checkpoint is still a plain model (merged)."""
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    n_parameters = count_parameters(model)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[ForwardLogs("sft", on_log)],
        peft_config=lora_config(lora, "CAUSAL_LM"),
    )
    trained = count_trainable(trainer.model)
    run = train_and_save(trainer, tokenizer, output_dir, "sft", lambda: load_causal_lm(model_path))
    return run | {"sft/n_parameters": float(n_parameters)} | ({"sft/n_trainable": float(trained)} if lora else {})
