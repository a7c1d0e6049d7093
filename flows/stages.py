"""The stage registry: one `Stage` row per stage, read by the flow, the cache key, the summary table and the tests.

A row names the stage (its key, artifact folder, MLflow `alignflow.stage` tag and summary line), its body in
`flows.bodies` (a function; its name is the Prefect task's `verb_noun` name), the component modules whose source
enters its key, the config slice its key covers, and its headline metrics. Adding a stage is one row plus its body.

Every task takes a `spec` (stage name, content key, output directory, its config slice, upstream results) and a
`run` (MLflow experiment and parent ids). The Prefect cache key is the stage key; `execute` adds the second layer
of the design: a finished stage directory (DONE marker) is reused even if Prefect's result store is gone, and an
unfinished one is wiped and rebuilt.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import Task, task

from flows import bodies
from flows.cache import build_manifest, finished, fresh_stage_dir, stage_lock, write_done
from flows.config import select
from flows.launch import launched
from flows.progress import PeakMemory
from flows.tracking import log_metrics, stage_run

Body = Callable[[dict[str, Any], Path, str], dict[str, float]]
log = logging.getLogger("alignflow")
Config = dict[str, Any]


def record_cached(result: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Give a reused stage its own child run (tagged cached, pointing at the producer) with metrics copied."""
    with stage_run(run["experiment_id"], run["parent_run_id"], result["stage"], result["key"], cached=True,
                   source_run_id=result["mlflow_run_id"]) as run_id:
        log_metrics(run_id, detail_metrics(result))
    return {**result, "cached": True}


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A stage result's headline numbers (its `Stage.headline`): logged once, on the pipeline run.

    Every number is logged on one run only, so no chart shows a pipeline run twice: the pipeline run carries the
    headline, the stage run the rest. A headline metric the stage logged itself while training (a curve, such as
    `ppo/mean_reward` by update) stays with its curve on the stage run.
    """
    stage = STAGES.get(result["stage"])
    curves = set(result.get("curves", ()))
    names = stage.headline if stage is not None else ()
    return {k: v for k, v in result["metrics"].items() if k in names and k not in curves}


def detail_metrics(result: dict[str, Any]) -> dict[str, float]:
    """What a stage run keeps: every metric of the result that is not on the pipeline run."""
    headline = headline_metrics(result)
    return {k: v for k, v in result["metrics"].items() if k not in headline}


def execute(spec: dict[str, Any], run: dict[str, Any], body: Body) -> dict[str, Any]:
    """Run `body` into the stage directory unless a DONE marker says it already finished."""
    with stage_lock(Path(spec["dir"])):
        return _execute_locked(spec, run, body)


def _execute_locked(spec: dict[str, Any], run: dict[str, Any], body: Body) -> dict[str, Any]:
    stage_dir = Path(spec["dir"])
    done = finished(spec["stage"], stage_dir, spec["options"]["verify"])
    if done is not None:
        return record_cached(done, run)
    fresh_stage_dir(stage_dir)
    start = time.monotonic()
    with stage_run(run["experiment_id"], run["parent_run_id"], spec["stage"], spec["key"], cached=False) as rid:
        seed_everything(spec["seed"])  # a stage rebuilt alone in a fresh process builds the same model
        try:
            with PeakMemory() as memory:
                metrics = {k: float(v) for k, v in body(spec, stage_dir, rid).items()}
        except Exception as err:
            log.error("[%s] failed: %s", spec["stage"], cause(err, stage_dir))  # one line, before any traceback
            raise
        seconds = time.monotonic() - start
        metrics[f"{spec['stage']}/seconds"] = seconds
        metrics[f"{spec['stage']}/peak_rss_gib"] = memory.peak_gib  # this process, while the stage ran
        already = MlflowClient().get_run(rid).data.metrics  # curves logged step by step stay as they are
        result = {"stage": spec["stage"], "key": spec["key"], "path": str(stage_dir), "metrics": metrics,
                  "mlflow_run_id": rid, "seconds": seconds, "cached": False, "manifest": build_manifest(stage_dir),
                  "curves": sorted(already)}
        log_metrics(rid, {k: v for k, v in detail_metrics(result).items() if k not in already})
        write_done(stage_dir, result)
    return result


def cause(err: BaseException, stage_dir: Path) -> str:
    """An error as one line, with what to do about a full disk or another I/O error."""
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"{text} — the disk holding {stage_dir.parent.parent} is full: free space and rerun (finished " \
               "stages are kept)"
    if isinstance(err, OSError):
        return f"{text} — an I/O error: check the path and its disk, then rerun (finished stages are kept)"
    return text


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) before a stage builds anything: new heads, dropout, shuffles."""
    from transformers import set_seed

    set_seed(seed)


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["spec"]["key"]


@dataclass(frozen=True)
class Stage:
    """One stage, one row: what runs, what its key covers, what the summary shows."""

    name: str  # key, artifact folder, MLflow tag `alignflow.stage`, summary row, upstream name for later stages
    body: Body  # flows.bodies function: (spec, stage_dir, run_id) -> metrics
    modules: tuple[str, ...]  # components modules whose source (and imports) enter the key
    config: Callable[[Config], Config]  # the config slice the key covers (e.g. `rl.*` touches only RL and eval)
    headline: tuple[str, ...] = ()  # metrics shown in the summary table
    inputs: Callable[[Config], list[str]] = lambda cfg: []  # outside files / hub ids it reads: keyed by content
    task: Task = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", _task(self.body))


def _task(body: Body) -> Task:
    """A Prefect task named after `body`: `execute` around it, cached by the stage key, results persisted as
    JSON (nothing is ever unpickled from storage)."""

    def run(spec: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
        return execute(spec, run, body)

    run.__name__ = run.__qualname__ = body.__name__
    run.__doc__ = body.__doc__
    return task(name=body.__name__, cache_key_fn=_cache_key, persist_result=True, result_serializer="json")(run)


def _on_device(*keys: str) -> Callable[[Config], Config]:
    """The slice `{key: cfg[key] for key in keys}` plus the device setting."""
    return lambda cfg: {**{k: cfg[k] for k in keys}, "device": cfg["device"]}


def _sft_config(cfg: Config) -> Config:
    return {"model": cfg["model"], "sft": cfg["sft"], "seed": cfg["seed"], **_scaling("sft", cfg)}


def _trainer(node: str) -> Callable[[Config], Config]:
    """A TRL stage's slice: its node, the device and `_scaling`."""
    return lambda cfg: {**_on_device(node)(cfg), **_scaling(node, cfg)}


def _ppo_config(cfg: Config) -> Config:
    """Our PPO's slice: `rl`, the device and `accelerate` when it launches (it has no LoRA)."""
    return {**_on_device("rl")(cfg), **_launching(cfg)}


def _launching(cfg: Config) -> Config:
    """`{"accelerate": …}` when the option launches, else nothing (a default run keeps its keys)."""
    accelerate = cfg.get("accelerate")
    return {"accelerate": accelerate} if launched(accelerate) else {}


def _scaling(node: str, cfg: Config) -> Config:
    """`accelerate` when the stage runs under `accelerate launch`, `peft` when it trains LoRA adapters: present only
    then, so a default run keeps its keys (and its cache)."""
    peft = cfg.get("peft") or {"method": "none"}
    extra = _launching(cfg)
    if peft["method"] != "none" and node in peft.get("stages", ()):
        extra["peft"] = peft
    return extra


def _with_gold(*keys: str) -> Callable[[Config], Config]:
    return lambda cfg: {**_on_device(*keys)(cfg), "gold": cfg["data"]["gold"]}


#: `reward` keys whose default leaves the reward model as it was: left out of the slice then (a default run keeps
#: its key); `mix` is saved in a per-annotator model, so it is part of that model's key.
REWARD_DEFAULTS = {"conditioning": "pooled", "mix": None}


def _reward_config(cfg: Config) -> Config:
    """The reward stage's slice: `_trainer("reward")` without the conditioning keys that are at their default."""
    sliced = _trainer("reward")(cfg)
    reward = {k: v for k, v in sliced["reward"].items() if k not in REWARD_DEFAULTS or v != REWARD_DEFAULTS[k]}
    return {**sliced, "reward": reward}


def _data_files(cfg: Config) -> list[str]:
    data = cfg["data"]
    if data["source"] != "files":
        return []
    nodes = [data.get(split) for split in ("sft", "preference", "preference_eval", "prompts")]
    return [node["path"] for node in nodes if isinstance(node, dict) and node.get("path")]


def _given(*dotted: str) -> Callable[[Config], list[str]]:
    """The values at `dotted` config paths that are set (model paths, hub ids)."""
    def pick(cfg: Config) -> list[str]:
        return [value for value in (select(cfg, path) for path in dotted) if isinstance(value, str) and value]
    return pick


def _feedback_request_config(cfg: Config) -> Config:
    """A feedback round's slice: what it samples and sends, not how long it waits or who simulates annotators."""
    keep = {k: v for k, v in cfg["feedback"].items() if k not in ("wait", "simulated_annotators")}
    return {"feedback": keep, "device": cfg["device"]}


def _feedback_models(cfg: Config) -> list[str]:
    """The checkpoints a feedback round reads besides SFT: its scoring reward models and the policy it samples."""
    fb = cfg["feedback"]
    return [*(fb.get("reward_models") or []), *([fb["policy_path"]] if fb.get("source") == "policy" else [])]


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", bodies.prepare_data, ("components.review_task", "components.data"), lambda cfg: cfg["data"],
          ("data/bayes_ceiling", "data/n_sft", "data/n_preference"), _data_files),
    Stage("sft", bodies.train_sft, ("components.sft", "components.modeling"), _sft_config, ("sft/train_loss",),
          _given("model.name_or_path")),
    Stage("revise", bodies.revise_demonstrations, ("components.revision",), _on_device("revision"),
          ("revise/changed_rate",), _given("revision.model_name_or_path")),
    Stage("sft_cai", bodies.train_sft, ("components.sft",), _sft_config, ("sft/train_loss",)),
    Stage("label", bodies.label_preferences, ("components.labeling", "components.judges"),
          _with_gold("label", "judge"), ("label/agreement_with_gold", "label/tie_rate"),
          _given("judge.settings.model", "judge.settings.path", "judge.settings.encoder")),
    Stage("feedback_request", bodies.request_feedback,
          ("components.feedback", "components.label_studio", "components.selection"), _feedback_request_config,
          ("feedback_request/n_sent",), _feedback_models),
    Stage("feedback", bodies.collect_feedback, ("components.feedback", "components.rankings"),
          lambda cfg: {"rankings": cfg["feedback"]["rankings"], "gold": cfg["data"]["gold"]},
          ("feedback/n_rankings", "feedback/n_pairs", "feedback/agreement_with_gold")),
    Stage("reward", bodies.train_reward_model, ("components.reward",), _reward_config,
          ("reward/eval_accuracy", "reward/bayes_ceiling"), _given("reward.model_name_or_path")),
    Stage("ppo", bodies.train_ppo, ("components.ppo",), _ppo_config, ("ppo/mean_reward", "ppo/kl")),
    Stage("rloo", bodies.train_rloo, ("components.trl_rl",), _on_device("rl"), ("rloo/mean_reward", "rloo/kl")),
    Stage("grpo", bodies.train_grpo, ("components.trl_rl",), _on_device("rl"), ("grpo/mean_reward", "grpo/kl")),
    Stage("dpo", bodies.train_dpo, ("components.dpo",), _trainer("dpo"), ("dpo/accuracy", "dpo/rewards_margin")),
    Stage("eval", bodies.evaluate_policy, ("components.evaluate",), _with_gold("eval"),
          ("eval/win_rate_vs_sft", "eval/gold_reward_mean", "eval/gold_reward_mean_sft", "eval/kl_to_sft",
           "eval/worst_profile_win_rate")),
    Stage("register", bodies.register_policy, ("components.promotion",),
          lambda cfg: {"registry": cfg["registry"], "tracking": cfg["tracking"]},
          ("register/version", "register/promoted")),
)}
