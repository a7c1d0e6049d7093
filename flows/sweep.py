"""A `-m` sweep is one MLflow run that closes with a verdict: a Hydra callback (`hydra.callbacks.sweep`).

- `on_multirun_start` creates the sweep run once, tagged with what the sweep varies (`hydra.sweeper.params` and
  the sweeps among the command line's overrides), the command line's overrides and the metric that decides.
  Jobs find its id in `ALIGNFLOW_SWEEP_RUN_ID` (the basic launcher runs them in this process; launchers that
  start processes hand the environment down) and hang their pipeline runs under it, named by what they vary.
- `on_job_end` counts failed jobs.
- `on_multirun_end` compares the sweep's pipeline runs (`flows.compare`: table, config diff, plots, logged on the
  sweep run), prints the table and the verdict, and ends the run FINISHED, or FAILED when a job failed.
  A sweep that stops early (a job raised, Ctrl-C, SIGTERM) never reaches `on_multirun_end`: an `atexit` hook
  then does the same and ends the run FAILED with the reason.

`hydra.callbacks.sweep.metric=eval/gold_reward_mean` (and `.mode=min` for a loss) changes what decides.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flows.config import CONF_DIR  # noqa: F401  (registers the `abspath` resolver the paths use)

SWEEP_ENV = "ALIGNFLOW_SWEEP_RUN_ID"
log = logging.getLogger("alignflow")


def current_sweep_run() -> str | None:
    """The id of the sweep run this job belongs to (None outside a sweep, or with the callback turned off)."""
    return os.environ.get(SWEEP_ENV) or None


def swept(task_overrides: list[str], sweeper_params: dict[str, Any] | None) -> dict[str, str]:
    """What a sweep varies, `{key: values}`: the sweeper's params, then the command line's sweeps (which win)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found = {str(k).lstrip("+~"): str(v) for k, v in (sweeper_params or {}).items()}
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        if override.is_sweep_override():
            found[override.key_or_group] = override.input_line.partition("=")[2]
    return found


def open_sweep_run(config: DictConfig, metric: str, mode: str) -> tuple[str, str]:
    """Create the sweep run (tags: what it varies, its overrides, the deciding metric); (run id, tracking URI)."""
    from mlflow.tracking import MlflowClient

    from flows.tracking import init_tracking, owner_tags

    tracking = OmegaConf.to_container(config.tracking, resolve=True)
    experiment_id = init_tracking(tracking)
    overrides = [str(o) for o in config.hydra.overrides.task]
    params = OmegaConf.to_container(OmegaConf.select(config, "hydra.sweeper.params") or OmegaConf.create({}))
    varied = swept(overrides, params)
    search = OmegaConf.select(config, "hydra.runtime.choices.hparams_search")
    name = " ".join(f"{k}={v}" for k, v in varied.items()) or " ".join(overrides) or "(defaults)"
    name = f"sweep {search}: {name}" if search else f"sweep {name}"
    tags = {"alignflow.sweep": str(config.hydra.sweep.dir), "alignflow.sweep.keys": json.dumps(list(varied)),
            "alignflow.sweep.params": json.dumps(varied), "alignflow.overrides": json.dumps(overrides),
            "alignflow.sweep.metric": metric, "alignflow.sweep.mode": mode, **owner_tags()}
    if search:
        tags["alignflow.hparams_search"] = str(search)
    client = MlflowClient(tracking["tracking_uri"])
    run_id = client.create_run(experiment_id, run_name=name[:250], tags=tags).info.run_id
    for key, values in varied.items():
        client.log_param(run_id, f"sweep.{key}", values[:6000])
    return run_id, tracking["tracking_uri"]


class SweepCallback(Callback):
    """Owns the sweep run of one `-m` invocation: opens it, counts failures, closes it with a verdict."""

    def __init__(self, metric: str = "eval/win_rate_vs_sft", mode: str = "max") -> None:
        self.metric, self.mode = metric, mode
        self.run_id: str | None = None
        self.tracking_uri = ""
        self.out_dir: Path | None = None
        self.jobs = 0
        self.failures: list[str] = []  # "overrides: error" per failed job
        self.closed = False
        self.start = time.monotonic()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.run_id, self.tracking_uri = open_sweep_run(config, self.metric, self.mode)
        self.out_dir = Path(str(config.hydra.sweep.dir)) / "compare"
        os.environ[SWEEP_ENV] = self.run_id
        atexit.register(self.close, "the sweep stopped before its end (a job raised, or the process was stopped)")
        log.info("sweep run %s (MLflow); jobs hang under it", self.run_id)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.jobs += 1
        if job_return.status == JobStatus.FAILED:
            error = getattr(job_return, "_return_value", None)
            self.failures.append(f"{' '.join(job_return.overrides or [])}: {type(error).__name__}: {error}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close()

    def close(self, stopped: str | None = None) -> None:
        """Compare the jobs (logged on the sweep run), print the verdict, end the run; once, whichever calls."""
        if self.run_id is None or self.closed:
            return
        self.closed = True
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        reasons = [r for r in (stopped, *(f"job failed: {f}" for f in self.failures)) if r]
        try:
            self._compare(client)
        except Exception as err:  # noqa: BLE001 - the run must still be closed
            log.warning("could not compare the sweep's runs: %s", err)
        try:
            from flows.tracking import log_metrics

            log_metrics(self.run_id, {"sweep/jobs": self.jobs, "sweep/failed_jobs": len(self.failures),
                                      "sweep/seconds": time.monotonic() - self.start})
            if reasons:
                client.set_tag(self.run_id, "alignflow.end_reason", "; ".join(reasons)[:5000])
            client.set_terminated(self.run_id, "FAILED" if reasons else "FINISHED")
        except Exception as err:  # noqa: BLE001 - the next start marks a run of a dead process KILLED
            log.warning("could not close the sweep run %s: %s", self.run_id, err)
        os.environ.pop(SWEEP_ENV, None)
        print(f"sweep run {self.run_id} {'FAILED: ' + '; '.join(reasons) if reasons else 'finished'}", flush=True)

    def _compare(self, client: Any) -> None:
        from flows.compare import compare, sweep_jobs

        runs = sweep_jobs(client, client.get_run(self.run_id))
        if not runs:
            log.warning("the sweep ran no pipeline: nothing to compare")
            return
        result = compare(client, runs, self.metric, self.mode, out_dir=self.out_dir, log_to=self.run_id)
        print("\n" + result.report(), flush=True)
