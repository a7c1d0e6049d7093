"""The `alignflow` command: a Hydra app (so `-m`, `--cfg job`, `--help` work) that calls the Prefect flow.

The flow receives the job's overrides, not the composed config, so a scheduled deployment can pass exactly the
same thing later. In a `-m` sweep every job hangs under one MLflow sweep run, which the Hydra callback in
`flows.sweep` opens before the first job and closes with a comparison and a verdict after the last.

Before the flow (and so before anything trains), the config's values are checked (`flows.config.validate_config`)
and then what they point at: machine, trainer args, judge, models and data files (`flows.preflight.preflight`).
A failure prints one line naming the field or file and the fix and exits with status 2; `HYDRA_FULL_ERROR=1`
adds the traceback. Prefect's temporary server (when no server is configured) starts between the two: it boots
while the slower second checks import the ML libraries, and is stopped if they fail (flows/temporary_server.py).
"""

from __future__ import annotations

import logging
import os
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from flows.config import CONF_DIR, ConfigError
from flows.dispatch import register_launcher

log = logging.getLogger("alignflow")
register_launcher()  # `hydra/launcher=prefect` (flows/dispatch.py): Hydra needs it registered before it instantiates


def fail(err: Exception) -> NoReturn:
    """Report an expected failure as one line (with the traceback only under HYDRA_FULL_ERROR=1), exit 2."""
    from flows.preflight import one_line

    log.error("%s", one_line(err), exc_info=os.environ.get("HYDRA_FULL_ERROR") == "1")
    raise SystemExit(2) from err


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Entry point: run the pipeline for this job's overrides; returns the gold win rate (for sweepers)."""
    from components.errors import DatasetValidationError
    from flows.config import to_plain, validate_config
    from flows.preflight import preflight

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    try:  # fail here, before anything trains
        config = to_plain(cfg)  # composed once, by Hydra; the flow gets it as it is
        validate_config(config)  # the values
    except ConfigError as err:
        fail(err)
    from flows import temporary_server

    temporary_server.spawn()  # Prefect's temporary server boots while the checks and imports below run
    try:
        try:
            preflight(config)  # what the values point at: machine, trainer args, judge, models, data files
        except (ConfigError, DatasetValidationError) as err:
            fail(err)
        from components.judges.base import JudgeError
        from flows.lifecycle import tie_children_to_process
        from flows.pipeline import alignflow
        from flows.sweep import current_sweep_run

        tie_children_to_process()  # SIGTERM ends runs FAILED; the temporary server (adopted) dies with us
        parent = current_sweep_run() if hc.mode == RunMode.MULTIRUN else None  # opened by flows.sweep's callback
        try:
            summary = alignflow(overrides=overrides, parent_run_id=parent, config=config)
        except (ConfigError, DatasetValidationError, JudgeError, OSError) as err:  # expected: no traceback needed
            fail(err)
    finally:
        temporary_server.cancel()  # one no flow adopted (a check failed) is stopped now
    metrics = {k: v for stage in summary["stages"] for k, v in stage["metrics"].items()}
    return metrics.get("eval/win_rate_vs_sft")


if __name__ == "__main__":
    main()
