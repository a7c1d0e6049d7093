"""Glue between Hugging Face trainers and alignflow's stage logging.

Trainers report through `on_log(step, metrics)`, the same callable our own PPO loop uses, so progress printing
and metric tracking live in one place (the flow) and components stay free of tracking code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PrinterCallback, Trainer, TrainerCallback

from components.hooks import StepLogger


class ForwardLogs(TrainerCallback):
    """Forward the trainer's logged numbers, renamed `<prefix>/<name>`, to `on_log` with the global step."""

    def __init__(self, prefix: str, on_log: StepLogger | None) -> None:
        self.prefix = prefix
        self.sink = on_log
        self.total_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D401 - HF callback signature
        self.total_steps = state.max_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sink is None or not logs:
            return
        numbers = {
            f"{self.prefix}/{k}": float(v)  # the end-of-run summary keeps train_*: its loss is a run mean
            for k, v in logs.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        numbers[f"{self.prefix}/total_steps"] = float(self.total_steps)
        self.sink(state.global_step, numbers)


def quiet(trainer: Trainer) -> Trainer:
    """Drop the callback that prints every log dict when tqdm is off: `ForwardLogs` reports progress instead."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def last_logged(log_history: list[dict[str, Any]], key: str) -> float:
    """The most recent value of `key` in a trainer's `state.log_history`, skipping the end-of-training summary.

    NaN when the key was never logged (e.g. `kl` with beta 0, or None values TRL logs for all-NaN windows).
    """
    steps = [h for h in log_history if h.get(key) is not None and "train_runtime" not in h]
    entries = steps or [h for h in log_history if h.get(key) is not None]
    return float(entries[-1][key]) if entries else float("nan")


def train_and_save(trainer: Trainer, tokenizer, output_dir: str | Path, prefix: str) -> dict[str, float]:
    """Train quietly, save model and tokenizer as a checkpoint in `output_dir`, return the run's summary:
    `<prefix>/train_loss` (mean over the run), `<prefix>/train_seconds` and `<prefix>/steps`."""
    result = quiet(trainer).train()
    generation = getattr(trainer.model, "generation_config", None)
    if generation is not None:  # sampling from the saved checkpoint must pad with the tokenizer's pad token
        generation.pad_token_id = tokenizer.pad_token_id
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return {
        f"{prefix}/train_loss": float(result.training_loss),
        f"{prefix}/train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        f"{prefix}/steps": float(result.global_step),
    }
