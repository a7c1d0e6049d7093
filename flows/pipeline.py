"""The Prefect flow: compose the config from overrides, then run the pipeline's stages in order.

The flow reads as a list of stage calls. `Pipeline` keeps the bookkeeping out of it: stage keys, where results
go, Prefect cache options, the MLflow parent run, and the summary table printed at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.cache import DamagedStage, DigestMemo, input_digest, read_done, stage_key
from flows.config import compose_config, validate_config
from flows.feedback import gather_feedback
from flows.prefect_run import flow_run_name, publish_summary, tag_flow_run
from flows.preflight import preflight
from flows.progress import summary_table
from flows.stages import STAGES, headline_metrics, record_cached
from flows.tracking import end_run, init_tracking, log_metrics, reconcile_dead_runs, start_pipeline_run

log = logging.getLogger("alignflow")


class Pipeline:
    """One pipeline run: MLflow parent run, stage keys and directories, Prefect cache options, summary."""

    def __init__(self, cfg: dict[str, Any], overrides: list[str], parent_run_id: str | None) -> None:
        self.start = time.monotonic()  # the total includes MLflow set-up: it is orchestration overhead too
        self.cfg = cfg
        self.experiment_id = init_tracking(cfg["tracking"])
        reconcile_dead_runs(self.experiment_id)  # runs left RUNNING by killed processes end KILLED
        tags = {"prefect.flow_run_id": str(flow_run.id or ""), "alignflow.root": cfg["paths"]["root_dir"]}
        self.run_id = start_pipeline_run(self.experiment_id, cfg, overrides, tags, parent_run_id)
        self.results: list[dict[str, Any]] = []
        self.memo = DigestMemo(Path(cfg["paths"]["root_dir"]) / ".alignflow" / "input_digests.json")

    def run(self, name: str, **upstream: dict[str, Any]) -> dict[str, Any]:
        """Run (or reuse) the stage `name` of the registry on the results of its upstream stages."""
        stage = STAGES[name]
        config = {**stage.config(self.cfg), "seed": self.cfg["seed"]}
        inputs = {source: input_digest(source, self.memo) for source in stage.inputs(self.cfg)}
        produced = {n: r["manifest"]["digest"] for n, r in upstream.items()}  # what upstream made, not its name
        key = stage_key(name, config, produced, list(stage.modules), inputs)
        stage_dir = Path(self.cfg["paths"]["artifact_dir"]) / name / key
        verify = self.cfg["cache"]["verify"]
        spec = {"stage": name, "key": key, "dir": str(stage_dir), "config": config, "upstream": upstream,
                "seed": self.cfg["seed"], "options": {"log_models": self.cfg["tracking"]["log_models"],
                                                      "verify": verify}}
        run = {"experiment_id": self.experiment_id, "parent_run_id": self.run_id}
        # A result Prefect cached earlier is only valid while its stage directory still holds the DONE marker.
        options = stage.task.with_options(result_storage=Path(self.cfg["paths"]["result_dir"]),
                                          refresh_cache=not _intact(stage_dir, verify))
        start = time.monotonic()
        state = options(spec, run, return_state=True)
        result = state.result()
        if state.name == "Cached":
            result = record_cached(result, run)
        result = {**result, "wall": time.monotonic() - start}
        log.info("[%s] %s in %.1fs (key %s)", name, "reused" if result["cached"] else "done", result["wall"], key)
        self.results.append(result)
        log_metrics(self.run_id, headline_metrics(result))  # the stage run keeps the rest: each number once
        return result

    def finish(self, ok: bool) -> dict[str, Any]:
        """Close the parent run and return the summary (also printed as a table)."""
        total = time.monotonic() - self.start
        log_metrics(self.run_id, {"pipeline/seconds": total,
                                  "pipeline/stages_cached": sum(r["cached"] for r in self.results)})
        end_run(self.run_id, ok)
        headline = {name: list(stage.headline) for name, stage in STAGES.items()}
        table = summary_table([{**r, "seconds": r["wall"]} for r in self.results], headline)
        table += _worst_served(self.results)
        outcome = "finished" if ok else "FAILED"
        log.info("pipeline %s %s after %.1fs\n%s", self.cfg["pipeline"]["name"], outcome, total, table)
        publish_summary(self.results, headline, ok, self.cfg["pipeline"]["name"],  # a Prefect table artifact
                        (self.cfg["tracking"]["tracking_uri"], self.experiment_id, self.run_id))
        uri = self.cfg["tracking"]["tracking_uri"]
        mlflow_cli = Path(sys.executable).parent / "mlflow"  # the one installed beside alignflow (.venv/bin)
        if uri.startswith(("http://", "https://")):  # a tracking server (tracking=server) serves its own UI
            log.info("MLflow run %s: %s/#/experiments/%s/runs/%s", self.run_id, uri.rstrip("/"),
                     self.experiment_id, self.run_id)
        else:
            log.info("MLflow run %s; browse with:  %s ui --backend-store-uri %s", self.run_id, mlflow_cli, uri)
        return {"mlflow_run_id": self.run_id, "seconds": total, "stages": self.results}


def _worst_served(results: list[dict[str, Any]]) -> str:
    """A line under the summary naming the annotator profile the policy serves worst (data with profiles only)."""
    from components.annotators import PROFILE_WIN_RATE, worst_served

    metrics = {k: v for r in results if r["stage"] == "eval" for k, v in r["metrics"].items()}
    worst = worst_served(metrics)
    if worst is None:
        return ""
    return f"\nserves profile {worst} worst: gold win rate vs SFT {metrics[PROFILE_WIN_RATE + worst]:.3f}"


def use_threads(n: int) -> None:
    """Give torch `n` CPU threads without importing it, so that a cached rerun never pays torch's import.

    When torch is already loaded its pool is resized now; otherwise the stage that first imports it reads
    OMP_NUM_THREADS/MKL_NUM_THREADS, which is how torch sizes its pool at import.
    """
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)


def _intact(stage_dir: Path, verify: str) -> bool:
    """True when the stage finished and its outputs still match its manifest (the task then reports why not)."""
    try:
        return read_done(stage_dir, verify) is not None
    except DamagedStage:
        return False


@flow(name="alignflow", flow_run_name=flow_run_name)  # e.g. "rlhf rl.kl_coef=0.1"
def alignflow(overrides: list[str] | None = None, parent_run_id: str | None = None,
              config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the configured alignment pipeline; `overrides` are Hydra overrides such as `rl.kl_coef=0.1`.

    `config` is the config already composed from those overrides (the CLI passes Hydra's); when absent (a
    deployment, a notebook) the flow composes it.

    rlhf: SFT → reward model → RL;  dpo: SFT → DPO;  rlaif / rlaif_dpo: the same with AI-labelled preferences.
    """
    overrides = list(overrides or [])
    cfg = config or compose_config(overrides)
    validate_config(cfg)
    tag_flow_run(cfg["pipeline"]["name"])  # with `alignflow`; a deployment's own tags stay
    preflight(cfg)  # machine, trainer args, judge, models, data files: before the MLflow run opens
    if cfg["num_threads"]:
        use_threads(cfg["num_threads"])
    kind = cfg["pipeline"]
    pipe = Pipeline(cfg, overrides, parent_run_id)
    try:
        data = pipe.run("data")
        sft = pipe.run("sft", data=data)
        if kind["revise"]:  # Constitutional AI: fine-tune the SFT model again on its own revised answers
            revised = pipe.run("revise", data=data, sft=sft)
            sft = pipe.run("sft_cai", data=data, sft=sft, revise=revised)
        feedback = {"data": data, "sft": sft}
        if kind["feedback"] == "ai":
            feedback["label"] = pipe.run("label", data=data, sft=sft)
        elif cfg["feedback"]["loop"]:  # people rank responses in Label Studio; the flow run waits for them
            feedback["label"] = gather_feedback(pipe, data=data, sft=sft)
        if kind["optimizer"] == "dpo":
            scored = {"policy": pipe.run("dpo", **feedback)}
        else:
            reward = pipe.run("reward", **feedback)
            scored = {"reward": reward, "policy": pipe.run(cfg["rl"]["algorithm"], **feedback, reward=reward)}
        evaluated = pipe.run("eval", data=data, sft=sft, **scored)
        pipe.run("register", eval=evaluated, policy=scored["policy"])  # the model registry's champion gate
    except BaseException:
        try:
            pipe.finish(ok=False)
        except Exception as err:  # e.g. a full disk: the store cannot be written; the next start closes the run
            log.warning("could not close the MLflow run %s: %s", pipe.run_id, err)
        raise
    return pipe.finish(ok=True)
