"""Prefect tasks, one per stage: each wraps one components/ function and returns a small JSON-able result.

Every task takes a `spec` (stage name, content key, output directory, its config slice, upstream results) and a
`run` (MLflow experiment and parent ids). The Prefect cache key is the stage key; `execute` adds the second layer
of the design: a finished stage directory (DONE marker) is reused even if Prefect's result store is gone, and an
unfinished one is wiped and rebuilt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task

from flows.cache import fresh_stage_dir, read_done, stage_lock, write_done
from flows.tracking import log_metrics, stage_run

Body = Callable[[dict[str, Any], Path, str], dict[str, float]]


def record_cached(result: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Give a reused stage its own child run (tagged cached, pointing at the producer) with metrics copied."""
    with stage_run(run["experiment_id"], run["parent_run_id"], result["stage"], result["key"], cached=True,
                   source_run_id=result["mlflow_run_id"]) as run_id:
        log_metrics(run_id, result["metrics"])
    return {**result, "cached": True}


def execute(spec: dict[str, Any], run: dict[str, Any], body: Body) -> dict[str, Any]:
    """Run `body` into the stage directory unless a DONE marker says it already finished."""
    with stage_lock(Path(spec["dir"])):
        return _execute_locked(spec, run, body)


def _execute_locked(spec: dict[str, Any], run: dict[str, Any], body: Body) -> dict[str, Any]:
    stage_dir = Path(spec["dir"])
    done = read_done(stage_dir)
    if done is not None:
        return record_cached(done, run)
    fresh_stage_dir(stage_dir)
    start = time.monotonic()
    with stage_run(run["experiment_id"], run["parent_run_id"], spec["stage"], spec["key"], cached=False) as rid:
        metrics = {k: float(v) for k, v in body(spec, stage_dir, rid).items()}
        seconds = time.monotonic() - start
        metrics[f"{spec['stage']}/seconds"] = seconds
        already = MlflowClient().get_run(rid).data.metrics  # curves logged step by step stay as they are
        log_metrics(rid, {k: v for k, v in metrics.items() if k not in already})
        result = {"stage": spec["stage"], "key": spec["key"], "path": str(stage_dir), "metrics": metrics,
                  "mlflow_run_id": rid, "seconds": seconds, "cached": False}
        write_done(stage_dir, result)
    return result


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["spec"]["key"]


def stage_task(name: str, body: str, doc: str):
    """A stage task: `execute` around `flows.bodies.<body>`, its Prefect cache keyed by the stage key and its
    result persisted as JSON (nothing is ever unpickled from storage)."""

    def run(spec: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
        from flows import bodies  # imported on first use: `alignflow --help` need not load torch and TRL

        return execute(spec, run, getattr(bodies, body))

    run.__name__ = run.__qualname__ = name
    run.__doc__ = doc
    return task(name=name, cache_key_fn=_cache_key, persist_result=True, result_serializer="json")(run)


prepare_data = stage_task(
    "prepare_data", "prepare_data_body",
    "Build or load the SFT, preference and prompt splits, validate them, and log them as MLflow datasets.")
train_sft = stage_task(
    "train_sft", "train_sft_body", "Supervised fine-tuning (TRL SFTTrainer) of the base model on the demonstrations.")
revise_demonstrations = stage_task(
    "revise_demonstrations", "revise_demonstrations_body",
    "Constitutional AI supervised phase: critique and revise SFT answers principle by principle.")
label_preferences = stage_task(
    "label_preferences", "label_preferences_body",
    "RLAIF feedback: sample pairs from the SFT model and have the configured AI judge label them.")
train_reward_model = stage_task(
    "train_reward_model", "train_reward_model_body",
    "Reward model (TRL RewardTrainer) on preference pairs, with held-out accuracy vs the Bayes ceiling.")
train_ppo = stage_task(
    "train_ppo", "train_ppo_body", "Our PPO against the reward model with a KL penalty to the frozen SFT reference.")
train_rloo = stage_task("train_rloo", "train_trl_rl_body", "RLOO (TRL RLOOTrainer) against the trained reward model.")
train_grpo = stage_task("train_grpo", "train_trl_rl_body", "GRPO (TRL GRPOTrainer) against the trained reward model.")
train_dpo = stage_task(
    "train_dpo", "train_dpo_body",
    "Direct preference optimisation (TRL DPOTrainer) from the SFT checkpoint, which is also the reference.")
evaluate_policy = stage_task(
    "evaluate_policy", "evaluate_policy_body",
    "Held-out comparison of the trained policy against SFT: proxy and gold reward, win rate, KL, samples.")
