"""The `alignflow` command: a Hydra app (so `-m`, `--cfg job`, `--help` work) that calls the Prefect flow.

The flow receives the job's overrides, not the composed config, so a scheduled deployment can pass exactly the
same thing later. In a `-m` sweep every job hangs under one MLflow sweep parent run.
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from flows.config import CONF_DIR, ConfigError

log = logging.getLogger("alignflow")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Entry point: run the pipeline for this job's overrides; returns the gold win rate (for sweepers)."""
    from flows.config import to_plain, validate_config

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    try:  # fail on bad values here, before a Prefect server starts or anything trains
        config = to_plain(cfg)  # composed once, by Hydra; the flow gets it as it is
        validate_config(config)
    except ConfigError as err:
        log.error("%s", err)
        raise SystemExit(2) from err
    from components.data import DatasetValidationError
    from components.judges.base import JudgeError
    from flows.pipeline import alignflow
    from flows.tracking import get_or_create_sweep_run, init_tracking

    parent = None
    if hc.mode == RunMode.MULTIRUN:
        parent = get_or_create_sweep_run(init_tracking(config["tracking"]), hc.sweep.dir, overrides)
    try:
        summary = alignflow(overrides=overrides, parent_run_id=parent, config=config)
    except (DatasetValidationError, JudgeError) as err:  # clear, expected failures: no traceback needed
        log.error("%s", err)
        raise SystemExit(2) from err
    metrics = {k: v for stage in summary["stages"] for k, v in stage["metrics"].items()}
    return metrics.get("eval/win_rate_vs_sft")


if __name__ == "__main__":
    main()
