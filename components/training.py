"""Glue between Hugging Face trainers and alignflow's stage logging.

Trainers report through `on_log(step, metrics)`, the same callable our own PPO loop uses, so progress printing
and metric tracking live in one place (the flow) and components stay free of tracking code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainerCallback

from components.hooks import StepLogger

LoraSettings = dict[str, Any]
"""`peft.LoraConfig` fields (r, lora_alpha, lora_dropout, target_modules, ...): LoRA instead of full fine-tuning."""


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


class WeightAverage(TrainerCallback):
    """Keep an exponential moving average of the weights over the optimiser steps (torch's `AveragedModel`) and
    load it into the model when training ends, so the saved model is the average, not the last noisy step.

    After step t the average is `decay * average + (1 - decay) * weights`, starting from the first step's weights;
    with `decay` 0.98 it spans roughly the last 50 steps. It needs every parameter in full on each process: not
    under DeepSpeed ZeRO-3 or FSDP, which shard them (the reward stage then leaves it off, with a warning).
    """

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay = {decay!r} is invalid: use a number in (0, 1), e.g. 0.98")
        self.decay = decay
        self.average: AveragedModel | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: D401 - HF callback signature
        if self.average is None:
            self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay))
        self.average.update_parameters(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.average is None:  # no step was taken
            return
        with torch.no_grad():
            for live, averaged in zip(model.parameters(), self.average.module.parameters(), strict=True):
                live.copy_(averaged)


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


def lora_config(settings: LoraSettings | None, task_type: str) -> Any:
    """A `peft.LoraConfig` from plain settings for a trainer's `peft_config` (None: train every weight).

    `task_type` is CAUSAL_LM or SEQ_CLS; for SEQ_CLS PEFT also trains the new scalar head in full."""
    if not settings:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, **settings)


def train_and_save(trainer: Trainer, tokenizer, output_dir: str | Path, prefix: str,
                   load_base: Callable[[], PreTrainedModel] | None = None) -> dict[str, float]:
    """Train quietly, save model and tokenizer as a checkpoint in `output_dir`, return the run's summary:
    `<prefix>/train_loss` (mean over the run), `<prefix>/train_seconds` and `<prefix>/steps`.

    `load_base` loads the model the trainer started from: a LoRA model is saved merged into it."""
    result = quiet(trainer).train()
    save_checkpoint(trainer, tokenizer, output_dir, load_base)
    return {
        f"{prefix}/train_loss": float(result.training_loss),
        f"{prefix}/train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        f"{prefix}/steps": float(result.global_step),
    }


def save_checkpoint(trainer: Trainer, tokenizer, output_dir: str | Path,
                    load_base: Callable[[], PreTrainedModel] | None = None) -> None:
    """Save the trained model and its tokenizer as one plain checkpoint (written by the main process only; every
    process calls it, so a sharded model is gathered first).

    A LoRA (PEFT) model is saved merged: its adapter goes to the trainer's scratch folder (the trainer gathers it
    under DDP, ZeRO or FSDP), then is merged into a fresh copy of the base from `load_base`. Later stages load
    the result as any model, with no adapter code."""
    if is_peft_model(trainer.model):
        adapter = Path(trainer.args.output_dir) / "adapter"
        trainer.save_model(str(adapter))
        if not trainer.args.should_save:
            return
        if load_base is None:
            raise ValueError("a LoRA model can only be saved merged: pass load_base, the model it started from")
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(), str(adapter)).merge_and_unload()
        _pad_generation(model, tokenizer)
        model.save_pretrained(str(output_dir))
    else:
        _pad_generation(trainer.model, tokenizer)
        trainer.save_model(str(output_dir))
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(output_dir))


def _pad_generation(model: Any, tokenizer) -> None:
    """Sampling from the saved checkpoint must pad with the tokenizer's pad token."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.pad_token_id = tokenizer.pad_token_id
