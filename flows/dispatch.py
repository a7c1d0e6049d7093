"""`hydra/launcher=prefect`: a `-m` sweep's jobs run as Prefect deployment runs on a work pool's workers.

The pipeline flow is deployed once to the work pool as `alignflow/<deployment>` (entrypoint `flows.pipeline.alignflow`
by module path: every worker needs alignflow installed; no image is built, nothing is uploaded). Each job becomes
one run of it with the job's overrides, the sweep run as `parent_run_id`, `num_threads=<cores // jobs at once>`
unless the job sets it, and an environment with the same `OMP_NUM_THREADS`, `ALIGNFLOW_SWEEP_RUN_ID`,
`ALIGNFLOW_ROOT` and `MLFLOW_TRACKING_URI` the launching process resolved. At most `jobs_at_once` runs are in
flight; when all have ended, Hydra gets one `JobReturn` per job, so the sweep callback (flows/sweep.py) counts the
failed ones and closes the sweep run with its verdict.

Jobs share the stage cache only where every worker sees the same `paths.root_dir` (one machine, or a shared
filesystem): a stage several jobs need is then built once while the others wait on its lock
(`flows.cache.stage_lock`). Settings: `conf/hydra/launcher/prefect.yaml`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from flows.prefect_run import answering_api
from flows.sweep import SWEEP_ENV

log = logging.getLogger("alignflow")
#: The name `conf/hydra/launcher/prefect.yaml` gives as `_target_` (see `register_launcher`).
PLUGIN_MODULE = "hydra_plugins.alignflow"
#: The pipeline flow by module path: a worker imports it from its own alignflow installation.
ENTRYPOINT = "flows.pipeline.alignflow"
#: What a job returns to Hydra, as `flows.cli.main` does: read from the job's MLflow pipeline run.
RETURN_METRIC = "eval/win_rate_vs_sft"
NO_SERVER = ("hydra/launcher=prefect needs a Prefect server: PREFECT_API_URL is not set. Start one (`prefect "
             "server start`), a work pool and workers (README, 'Sweeps on workers'), then export "
             "PREFECT_API_URL=http://127.0.0.1:4200/api")


class DispatchError(RuntimeError):
    """A server, work pool or job that cannot work; the message names the fix."""


class JobFailed(RuntimeError):
    """A job's flow run ended in another state than Completed (or ran past the timeout)."""


@dataclass
class Job:
    """One sweep job: Hydra's overrides, its composed config and output folder, what its flow run gets."""

    idx: int
    overrides: list[str]  # as Hydra gave them (what the sweep callback reports)
    config: DictConfig  # the job's composed config, hydra node included
    out_dir: Path
    parameters: dict[str, Any]  # the flow's parameters: overrides (+ num_threads), parent_run_id
    env: dict[str, str]


def thread_split(cores: int | None, jobs_at_once: int, n_jobs: int) -> int:
    """Torch threads per job: the cores (null: this machine's) shared by the jobs that run at once, at least 1."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, min(jobs_at_once, n_jobs)))


def with_threads(overrides: Sequence[str], threads: int) -> tuple[list[str], int]:
    """The job's overrides plus `num_threads=threads` (unless it sets num_threads itself), and its threads."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "num_threads":
            return list(overrides), int(value) if value.strip().isdigit() else threads
    return [*overrides, f"num_threads={threads}"], threads


def job_env(threads: int, sweep_run_id: str | None, root: str, tracking_uri: str,
            forward: Sequence[str]) -> dict[str, str]:
    """The environment a job's flow run gets on top of its worker's: threads, sweep run, store and tracking URI
    as resolved here, and the variables named in `forward` that are set here."""
    env = {"OMP_NUM_THREADS": str(threads), "ALIGNFLOW_ROOT": root, "MLFLOW_TRACKING_URI": tracking_uri}
    if sweep_run_id:
        env[SWEEP_ENV] = sweep_run_id
    return {**{k: os.environ[k] for k in forward if k in os.environ}, **env}


def job_return(job_overrides: Sequence[str], state: str, message: str, value: Any, working_dir: str,
               config: DictConfig | None = None) -> JobReturn:
    """Hydra's record of one finished job: COMPLETED with its value, else FAILED with a JobFailed saying why."""
    ret = JobReturn(overrides=list(job_overrides), working_dir=working_dir, task_name="alignflow")
    if config is not None:
        ret.hydra_cfg = config
        ret.cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    if state == "COMPLETED":
        ret.status, ret.return_value = JobStatus.COMPLETED, value
    else:
        ret.status = JobStatus.FAILED
        ret.return_value = JobFailed(f"flow run ended {state}" + (f": {message}" if message else ""))
    return ret


@cache
def register_launcher() -> type:
    """Make `PrefectLauncher` instantiable by Hydra as `hydra_plugins.alignflow.PrefectLauncher` (idempotent).

    Hydra 1.3 instantiates a launcher only from a class that its plugin registry knows under a name starting with
    `hydra_plugins.` and that it can import under that name (hydra/core/plugins.py `Plugins._instantiate`, then
    `_locate`): `_target_: flows.dispatch.PrefectLauncher` is refused. Instead of a `hydra_plugins/` package
    (outside this repo's layout, found by discovery), this registers an alias of the class through Hydra's public
    `Plugins.register` and makes it importable as module `hydra_plugins.alignflow`, in this process only;
    `flows.cli` calls it when imported, before Hydra instantiates the launcher. Workers never need it."""
    import importlib
    import sys
    import types

    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # discovers the installed plugins first (a real `hydra_plugins` package, if any)
    try:
        package = importlib.import_module("hydra_plugins")
    except ModuleNotFoundError:
        package = sys.modules["hydra_plugins"] = types.ModuleType("hydra_plugins")
        package.__path__ = []  # an empty namespace: nothing else to find in it
    module = types.ModuleType(PLUGIN_MODULE, "alignflow's Hydra launcher (flows.dispatch), registered at run time.")
    alias = type("PrefectLauncher", (PrefectLauncher,), {"__module__": PLUGIN_MODULE, "__doc__": __doc__})
    module.PrefectLauncher = alias
    sys.modules[PLUGIN_MODULE] = module
    setattr(package, PLUGIN_MODULE.rpartition(".")[2], module)
    plugins.register(alias)
    return alias


def deploy(name: str, pool: str) -> str:
    """Deploy the pipeline flow to work pool `pool` as `alignflow/<name>` (updated in place if it exists) and
    return the pool's type; warns when no worker polls the pool. The flow is referenced by module path and its
    parameter schema read from the source, so nothing heavy is imported here."""
    from prefect import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    with get_client(sync_client=True) as client:
        try:
            kind = client.read_work_pool(pool).type
        except ObjectNotFound as err:
            raise DispatchError(f"work pool `{pool}` does not exist: create it (`prefect work-pool create {pool} "
                                f"--type process`) and start workers (`prefect worker start --pool {pool}`), or "
                                "name another with hydra.launcher.work_pool=…") from err
        schema = parameter_schema_from_entrypoint(ENTRYPOINT).model_dump(exclude_unset=True)
        client.create_deployment(flow_id=client.create_flow_from_name("alignflow"), name=name, work_pool_name=pool,
                                 entrypoint=ENTRYPOINT, parameter_openapi_schema=schema, enforce_parameter_schema=True,
                                 pull_steps=[], tags=["alignflow", "sweep"],
                                 description="alignflow sweep jobs (hydra/launcher=prefect, flows/dispatch.py)")
        online = client.read_workers_for_work_pool(pool, worker_filter=WorkerFilter(
            status=WorkerFilterStatus(any_=["ONLINE"])))
    if not online:
        log.warning("no worker polls work pool `%s` yet: the jobs wait until one does (`prefect worker start "
                    "--pool %s`)", pool, pool)
    return kind


class PrefectLauncher(Launcher):
    """Runs a sweep's jobs as runs of one Prefect deployment on a work pool; `conf/hydra/launcher/prefect.yaml`."""

    def __init__(self, work_pool: str, deployment: str, jobs_at_once: int, cores: int | None,
                 poll_seconds: float, job_timeout_minutes: float | None, forward_env: Sequence[str],
                 job_variables: dict[str, Any] | None) -> None:
        self.work_pool, self.deployment, self.jobs_at_once = work_pool, deployment, int(jobs_at_once)
        self.cores, self.poll_seconds, self.timeout_minutes = cores, float(poll_seconds), job_timeout_minutes
        self.forward_env = [str(name) for name in forward_env or []]
        self.job_variables: dict[str, Any] = OmegaConf.to_container(OmegaConf.create(job_variables or {}),
                                                                    resolve=True)  # plain JSON for the API
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Deploy, submit every job (at most `jobs_at_once` in flight), wait, and return one JobReturn each."""
        from flows.config import ConfigError
        from flows.preflight import one_line

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        try:
            url = answering_api(DispatchError, NO_SERVER)
            threads = thread_split(self.cores, self.jobs_at_once, len(job_overrides))
            jobs = [self._job(initial_job_idx + i, list(o), threads) for i, o in enumerate(job_overrides)]
            kind = deploy(self.deployment, self.work_pool)
        except (DispatchError, ConfigError) as err:
            log.error("%s", one_line(err))
            raise SystemExit(2) from err
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # as Hydra's basic launcher does
        signal.signal(signal.SIGTERM, _stop)  # in-flight runs are cancelled, the sweep run closed FAILED
        log.info("dispatching %d jobs to work pool `%s` (%s) on %s: %d at once, %d thread(s) each",
                 len(jobs), self.work_pool, kind, url, min(self.jobs_at_once, len(jobs)), threads)
        variables = {**self.job_variables, "working_dir": os.getcwd()} if kind == "process" else self.job_variables
        return self._run(jobs, variables)

    def _job(self, idx: int, overrides: list[str], threads: int) -> Job:
        """Compose and validate job `idx` here (bad values fail before anything is submitted), write its
        `.hydra/` files into its sweep subfolder, and build its flow run's parameters and environment."""
        from hydra.core.hydra_config import HydraConfig

        from flows.config import to_plain, validate_config
        from flows.sweep import current_sweep_run

        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = idx
        HydraConfig.instance().set_config(config)  # as Hydra's run_job does: `${hydra:…}` resolves for this job
        plain = to_plain(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
        validate_config(plain)
        out_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        (out_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(overrides), out_dir / ".hydra" / "overrides.yaml")
        OmegaConf.save(OmegaConf.create(plain), out_dir / ".hydra" / "config.yaml")
        run_overrides, own = with_threads(overrides, threads)
        sweep_run = current_sweep_run()
        env = job_env(own, sweep_run, plain["paths"]["root_dir"], plain["tracking"]["tracking_uri"], self.forward_env)
        return Job(idx, overrides, config, out_dir, {"overrides": run_overrides, "parent_run_id": sweep_run}, env)

    def _run(self, jobs: list[Job], variables: dict[str, Any]) -> list[JobReturn]:
        """Keep up to `jobs_at_once` runs in flight until every job has ended; cancel those in flight if stopped."""
        from prefect import get_client

        waiting, flying, done = deque(jobs), {}, {}
        with get_client(sync_client=True) as client:
            try:
                while waiting or flying:
                    while waiting and len(flying) < self.jobs_at_once:
                        job = waiting.popleft()
                        flying[self._submit(job, variables)] = (job, time.monotonic())
                    time.sleep(self.poll_seconds)
                    for run_id, (job, state, message) in self._poll(client, flying).items():
                        done[job.idx] = self._finish(job, run_id, state, message, flying.pop(run_id)[1])
            except BaseException:
                _cancel(client, list(flying), "the sweep was stopped")
                raise
        return [done[job.idx] for job in jobs]

    def _submit(self, job: Job, variables: dict[str, Any]) -> Any:
        from prefect.deployments import run_deployment

        assert self.hydra_context is not None
        self.hydra_context.callbacks.on_job_start(config=job.config, task_function=self.task_function)
        env = {**(variables.get("env") or {}), **job.env}
        run = run_deployment(f"alignflow/{self.deployment}", parameters=job.parameters, timeout=0,
                             job_variables={**variables, "env": env}, tags=["alignflow", "sweep"], as_subflow=False)
        log.info("\t#%d : %s → flow run %s", job.idx, " ".join(filter_overrides(job.overrides)), run.id)
        return run.id

    def _poll(self, client: Any, flying: dict[Any, tuple[Job, float]]) -> dict[Any, tuple[Job, str, str]]:
        """The runs in flight that ended (or ran past the timeout, then cancelled): {id: (job, state, message)}."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        ended = {}
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flying))))
        for run in runs:
            job, start = flying[run.id]
            if run.state is not None and run.state.is_final():
                ended[run.id] = (job, run.state.type.value, run.state.message or run.state.name)
            elif self.timeout_minutes and time.monotonic() - start > 60 * float(self.timeout_minutes):
                _cancel(client, [run.id], f"ran past hydra.launcher.job_timeout_minutes={self.timeout_minutes}")
                ended[run.id] = (job, "TIMED_OUT", f"cancelled after {self.timeout_minutes} min")
        return ended

    def _finish(self, job: Job, run_id: Any, state: str, message: str, start: float) -> JobReturn:
        assert self.hydra_context is not None
        plain = OmegaConf.to_container(job.config.tracking, resolve=True)
        value = _pipeline_metric(plain, str(run_id)) if state == "COMPLETED" else None
        ret = job_return(job.overrides, state, message, value, str(job.out_dir), job.config)
        log.info("\t#%d %s after %.0fs (flow run %s)", job.idx, state, time.monotonic() - start, run_id)
        self.hydra_context.callbacks.on_job_end(config=job.config, job_return=ret)
        return ret


def _stop(signum: int, frame: object) -> None:
    """SIGTERM ends the launcher like Ctrl-C: SystemExit unwinds through the cancelling of its runs."""
    raise SystemExit(128 + signum)


def _cancel(client: Any, run_ids: list[Any], reason: str) -> None:
    """Ask the workers to stop these flow runs (best effort)."""
    from prefect.states import Cancelling

    for run_id in run_ids:
        try:
            client.set_flow_run_state(run_id, Cancelling(message=reason), force=True)
        except Exception as err:  # noqa: BLE001 - the server may be gone too
            log.warning("could not cancel flow run %s: %s", run_id, err)


def _pipeline_metric(tracking: dict[str, Any], flow_run_id: str) -> float | None:
    """RETURN_METRIC of the MLflow pipeline run that a flow run wrote (tag `prefect.flow_run_id`), or None."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking["tracking_uri"])
        experiment = client.get_experiment_by_name(tracking["experiment_name"])
        runs = client.search_runs([experiment.experiment_id], max_results=1,
                                  filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        return runs[0].data.metrics.get(RETURN_METRIC) if runs else None
    except Exception as err:  # noqa: BLE001 - the value is for sweepers; the sweep run has the comparison
        log.warning("could not read %s of flow run %s from MLflow: %s", RETURN_METRIC, flow_run_id, err)
        return None
