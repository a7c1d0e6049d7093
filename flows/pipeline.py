"""The Prefect flow: compose the config from overrides, then run the pipeline's stages in order.

The flow reads as a list of stage calls. `Pipeline` keeps the bookkeeping out of it: stage keys, where results
go, Prefect cache options, the MLflow parent run, and the summary table printed at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from prefect import flow
from prefect.runtime import flow_run

from flows.cache import read_done, stage_key
from flows.config import compose_config, validate_config
from flows.progress import summary_table
from flows.stages import (
    evaluate_policy,
    label_preferences,
    prepare_data,
    record_cached,
    revise_demonstrations,
    train_dpo,
    train_grpo,
    train_ppo,
    train_reward_model,
    train_rloo,
    train_sft,
)
from flows.tracking import end_run, init_tracking, log_metrics, start_pipeline_run

log = logging.getLogger("alignflow")

# Component modules each stage calls: their source (and what they import) is part of the stage key.
STAGE_MODULES = {
    "data": ["components.review_task", "components.data"],
    "sft": ["components.sft", "components.modeling"],
    "revise": ["components.revision"],
    "sft_cai": ["components.sft"],
    "reward": ["components.reward"],
    "label": ["components.labeling", "components.judges"],
    "ppo": ["components.ppo"],
    "rloo": ["components.trl_rl"],
    "grpo": ["components.trl_rl"],
    "dpo": ["components.dpo"],
    "eval": ["components.evaluate"],
}
RL_TASKS = {"ppo": train_ppo, "rloo": train_rloo, "grpo": train_grpo}
HEADLINE = {
    "data": ["data/bayes_ceiling", "data/n_sft", "data/n_preference"],
    "sft": ["sft/train_loss"],
    "revise": ["revise/changed_rate"],
    "sft_cai": ["sft/train_loss"],
    "reward": ["reward/eval_accuracy", "reward/bayes_ceiling"],
    "label": ["label/agreement_with_gold", "label/tie_rate"],
    "ppo": ["ppo/mean_reward", "ppo/kl"],
    "rloo": ["rloo/mean_reward", "rloo/kl"],
    "grpo": ["grpo/mean_reward", "grpo/kl"],
    "dpo": ["dpo/accuracy", "dpo/rewards_margin"],
    "eval": ["eval/win_rate_vs_sft", "eval/gold_reward_mean", "eval/gold_reward_mean_sft", "eval/kl_to_sft"],
}


class Pipeline:
    """One pipeline run: MLflow parent run, stage keys and directories, Prefect cache options, summary."""

    def __init__(self, cfg: dict[str, Any], overrides: list[str], parent_run_id: str | None) -> None:
        self.start = time.monotonic()  # the total includes MLflow set-up: it is orchestration overhead too
        self.cfg = cfg
        self.experiment_id = init_tracking(cfg["tracking"])
        tags = {"prefect.flow_run_id": str(flow_run.id or ""), "alignflow.root": cfg["paths"]["root_dir"]}
        self.run_id = start_pipeline_run(self.experiment_id, cfg, overrides, tags, parent_run_id)
        self.results: list[dict[str, Any]] = []

    def stage(self, task, stage: str, config: dict[str, Any], upstream: dict[str, dict]) -> dict[str, Any]:
        """Run (or reuse) one stage task and record its result."""
        key = stage_key(stage, config, {n: r["key"] for n, r in upstream.items()}, STAGE_MODULES[stage])
        stage_dir = Path(self.cfg["paths"]["artifact_dir"]) / stage / key
        spec = {"stage": stage, "key": key, "dir": str(stage_dir), "config": config, "upstream": upstream,
                "options": {"log_models": self.cfg["tracking"]["log_models"]}}
        run = {"experiment_id": self.experiment_id, "parent_run_id": self.run_id}
        # A result Prefect cached earlier is only valid while its stage directory still holds the DONE marker.
        options = task.with_options(result_storage=Path(self.cfg["paths"]["result_dir"]),
                                    refresh_cache=read_done(stage_dir) is None)
        start = time.monotonic()
        state = options(spec, run, return_state=True)
        result = state.result()
        if state.name == "Cached":
            result = record_cached(result, run)
        result = {**result, "wall": time.monotonic() - start}
        log.info("[%s] %s in %.1fs (key %s)", stage, "reused" if result["cached"] else "done", result["wall"], key)
        self.results.append(result)
        log_metrics(self.run_id, result["metrics"])
        return result

    def finish(self, ok: bool) -> dict[str, Any]:
        """Close the parent run and return the summary (also printed as a table)."""
        total = time.monotonic() - self.start
        log_metrics(self.run_id, {"pipeline/seconds": total,
                                  "pipeline/stages_cached": sum(r["cached"] for r in self.results)})
        end_run(self.run_id, ok)
        table = summary_table([{**r, "seconds": r["wall"]} for r in self.results], HEADLINE)
        outcome = "finished" if ok else "FAILED"
        log.info("pipeline %s %s after %.1fs\n%s", self.cfg["pipeline"]["name"], outcome, total, table)
        uri = self.cfg["tracking"]["tracking_uri"]
        mlflow_cli = Path(sys.executable).parent / "mlflow"  # the one installed beside alignflow (.venv/bin)
        log.info("MLflow run %s; browse with:  %s ui --backend-store-uri %s", self.run_id, mlflow_cli, uri)
        return {"mlflow_run_id": self.run_id, "seconds": total, "stages": self.results}


def _stage_configs(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config slice each stage's key covers: changing `rl.*` touches only the RL stage and eval."""
    device = cfg["device"]
    return {
        "data": cfg["data"],
        "sft": {"model": cfg["model"], "sft": cfg["sft"], "seed": cfg["seed"]},
        "label": {"judge": cfg["judge"], "gold": cfg["data"]["gold"], "device": device},
        "reward": {"reward": cfg["reward"], "device": device},
        "rl": {"rl": cfg["rl"], "device": device},
        "dpo": {"dpo": cfg["dpo"], "device": device},
        "revise": {"revision": cfg["revision"], "device": device},
        "eval": {"eval": cfg["eval"], "gold": cfg["data"]["gold"], "device": device},
    }


@flow(name="alignflow")
def alignflow(overrides: list[str] | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run the configured alignment pipeline; `overrides` are Hydra overrides such as `rl.kl_coef=0.1`.

    rlhf: SFT → reward model → RL;  dpo: SFT → DPO;  rlaif / rlaif_dpo: the same with AI-labelled preferences.
    """
    overrides = list(overrides or [])
    cfg = compose_config(overrides)
    validate_config(cfg)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    conf, kind = _stage_configs(cfg), cfg["pipeline"]
    pipe = Pipeline(cfg, overrides, parent_run_id)
    try:
        data = pipe.stage(prepare_data, "data", conf["data"], {})
        sft = pipe.stage(train_sft, "sft", conf["sft"], {"data": data})
        if kind["revise"]:  # Constitutional AI: fine-tune the SFT model again on its own revised answers
            revised = pipe.stage(revise_demonstrations, "revise", conf["revise"], {"data": data, "sft": sft})
            sft = pipe.stage(train_sft, "sft_cai", conf["sft"], {"data": data, "sft": sft, "revise": revised})
        feedback = {"data": data, "sft": sft}
        if kind["feedback"] == "ai":
            feedback["label"] = pipe.stage(label_preferences, "label", conf["label"], {"data": data, "sft": sft})
        if kind["optimizer"] == "dpo":
            scored = {"policy": pipe.stage(train_dpo, "dpo", conf["dpo"], feedback)}
        else:
            reward = pipe.stage(train_reward_model, "reward", conf["reward"], feedback)
            algorithm = cfg["rl"]["algorithm"]
            policy = pipe.stage(RL_TASKS[algorithm], algorithm, conf["rl"], {**feedback, "reward": reward})
            scored = {"reward": reward, "policy": policy}
        pipe.stage(evaluate_policy, "eval", conf["eval"], {"data": data, "sft": sft, **scored})
    except BaseException:
        pipe.finish(ok=False)
        raise
    return pipe.finish(ok=True)
