"""Sweeps dispatched to Prefect workers (`hydra/launcher=prefect`, flows/dispatch.py) on one MLflow server.

The default suite checks the launcher's own parts without servers: the thread split, the overrides and the
environment a job gets, how a flow run's end becomes Hydra's JobReturn (and the sweep callback's failure count),
that `hydra/launcher=prefect` instantiates it, and that it refuses to run without a Prefect server.

The `cluster` case (marker `cluster`, `make test-cluster`) starts a throwaway PostgreSQL cluster (initdb, pg_ctl
on a free port), an MLflow server on it, a Prefect server, a process work pool and two workers, then runs one
4-job tiny sweep twice on fresh roots: dispatched to the workers (2 jobs at once, 1 thread each) and one job after
another (Hydra's basic launcher, 1 thread). All four jobs finish, the sweep run closes with a verdict, SFT is
trained once, every run is in the PostgreSQL store, and the dispatched sweep takes less wall time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.utils import JobStatus

from flows.dispatch import NO_SERVER, JobFailed, job_env, job_return, register_launcher, thread_split, with_threads
from flows.sweep import SWEEP_ENV, SweepCallback
from tests.helpers import TINY, cli_env, free_port, stop_group, wait_healthy

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KL = "rl.kl_coef=0.05,0.1,0.2,0.4"
#: TINY with more PPO updates (the part of each job that runs in parallel) and no fixed num_threads.
JOB = [o for o in TINY if not o.startswith(("num_threads=", "rl.total_updates="))] + ["rl.total_updates=96"]


# ----------------------------------------------------------------------------------- the launcher's own parts
def test_each_job_gets_the_cores_shared_by_the_jobs_at_once():
    assert thread_split(2, 2, 4) == 1
    assert thread_split(16, 4, 10) == 4
    assert thread_split(8, 4, 1) == 8  # a lone job gets every core
    assert thread_split(1, 4, 4) == 1  # never 0
    assert thread_split(None, 1, 3) == (os.cpu_count() or 1)


def test_num_threads_is_added_unless_the_job_sets_it():
    assert with_threads(["rl.kl_coef=0.1"], 2) == (["rl.kl_coef=0.1", "num_threads=2"], 2)
    assert with_threads(["num_threads=3", "rl.kl_coef=0.1"], 2) == (["num_threads=3", "rl.kl_coef=0.1"], 3)
    assert with_threads(["num_threads=null"], 2) == (["num_threads=null"], 2)  # torch decides; OMP gets the split


def test_job_environment_names_threads_sweep_store_and_tracking(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    env = job_env(2, "abc", "/shared/root", "http://mlflow:5000", ["HF_HUB_OFFLINE", "HF_HOME"])
    assert env == {"OMP_NUM_THREADS": "2", "ALIGNFLOW_ROOT": "/shared/root", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                   SWEEP_ENV: "abc", "HF_HUB_OFFLINE": "1"}
    assert SWEEP_ENV not in job_env(1, None, "/r", "sqlite:////r/mlruns/mlflow.db", [])


def test_flow_run_states_become_job_returns_the_sweep_callback_counts():
    ok = job_return(["rl.kl_coef=0.1"], "COMPLETED", "", 0.7, "/sweep/0")
    assert ok.status == JobStatus.COMPLETED and ok.return_value == 0.7 and ok.working_dir == "/sweep/0"
    failed = job_return(["rl.kl_coef=0.2"], "CRASHED", "worker died", None, "/sweep/1")
    assert failed.status == JobStatus.FAILED and failed.overrides == ["rl.kl_coef=0.2"]
    with pytest.raises(JobFailed, match="flow run ended CRASHED: worker died"):
        _ = failed.return_value
    callback = SweepCallback()
    for ret in (ok, failed):
        callback.on_job_end(config=None, job_return=ret)
    assert callback.jobs == 2
    assert callback.failures == ["rl.kl_coef=0.2: JobFailed: flow run ended CRASHED: worker died"]


def _launcher():
    """`hydra/launcher=prefect` composed and instantiated as Hydra does it (conf/hydra/launcher/prefect.yaml)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    from flows.config import CONF_DIR

    register_launcher()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=prefect", "tracking=server"], return_hydra_config=True)
    context = HydraContext(config_loader=None, callbacks=Callbacks())
    return Plugins.instance().instantiate_launcher(hydra_context=context, task_function=lambda c: None, config=cfg)


def test_hydra_instantiates_the_launcher_from_its_config_group():
    from flows.dispatch import PrefectLauncher

    launcher = _launcher()
    assert isinstance(launcher, PrefectLauncher) and type(launcher).__module__ == "hydra_plugins.alignflow"
    assert (launcher.work_pool, launcher.deployment, launcher.jobs_at_once) == ("alignflow", "sweep-job", 2)
    assert register_launcher() is type(launcher)  # registering twice changes nothing


def test_launcher_refuses_a_temporary_server_in_one_line(caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    launcher = _launcher()
    logger = logging.getLogger("alignflow")  # Prefect's logging set-up stops it propagating to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SystemExit) as exit_info:
            launcher.launch([["rl.kl_coef=0.1"]], initial_job_idx=0)
    finally:
        logger.removeHandler(caplog.handler)
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # twice when an earlier test left
    assert errors and set(errors) == {NO_SERVER} and "\n" not in NO_SERVER  # the logger propagating: one line


def test_tracking_server_option_points_at_the_server(monkeypatch):
    from flows.config import compose_config, validate_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    cfg = compose_config(["tracking=server"])
    validate_config(cfg)
    assert cfg["tracking"] == {**compose_config([])["tracking"], "tracking_uri": "http://mlflow.internal:5000",
                               "artifact_root": None}


# ------------------------------------------------------------------------------------------- a real cluster
def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: there, run its binaries as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"`{name}` not found: install PostgreSQL's server binaries (Debian: apt-get install postgresql)")
    return str(found)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb, pg_ctl) on 127.0.0.1 and a free port with an empty database
    `mlflow`; stopped and deleted at the end. Its URI for MLflow."""
    import psycopg2

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    home = Path(tempfile.mkdtemp(prefix="alignflow-pg-"))  # not under pytest's root-only tmp: postgres reads it
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    data, port = home / "data", free_port()
    try:
        subprocess.run(_as_postgres([initdb, "-D", str(data), "-A", "trust", "-U", "postgres"]),
                       check=True, capture_output=True)
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-o", f"-p {port} -k {home} -c listen_addresses="
                                     "127.0.0.1", "-l", str(home / "server.log"), "-w", "start"]),
                       check=True, capture_output=True)
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory) -> Iterator[dict[str, str]]:
    """An MLflow server on the PostgreSQL store, a Prefect server, work pool `alignflow` (process) and two
    workers (one run at a time each); every process stopped at the end."""
    tmp = tmp_path_factory.mktemp("cluster")
    mlflow_url, prefect_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/api"
    env = cli_env(PREFECT_HOME=str(tmp / "prefect"), PREFECT_API_URL=prefect_url, PREFECT_UI_API_URL=prefect_url,
                  PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_TRACKING_URI=mlflow_url,
                  PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> tuple[subprocess.Popen, Path]:
        log = tmp / f"{name}.log"
        with log.open("w") as out:
            procs.append(subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=tmp))
        return procs[-1], log

    try:
        store = postgres.replace("postgresql://", "postgresql+psycopg2://")  # SQLAlchemy 2.1's default is psycopg 3
        mlflow = start("mlflow", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
                       str(tmp / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", mlflow_url.rsplit(":", 1)[1],
                       "--workers", "1")
        prefect = start("prefect", "prefect", "server", "start", "--host", "127.0.0.1",
                        "--port", prefect_url.rsplit(":", 1)[1].removesuffix("/api"))
        wait_healthy(f"{prefect_url}/health", *prefect, 180, "prefect server")
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "alignflow", "--type", "process"], env=env,
                       check=True, capture_output=True, cwd=tmp)
        for i in (1, 2):
            start(f"worker-{i}", "prefect", "worker", "start", "--pool", "alignflow", "--limit", "1",
                  "--name", f"worker-{i}")
        wait_healthy(f"{mlflow_url}/health", *mlflow, 180, "mlflow server")
        yield {"mlflow": mlflow_url, "prefect": prefect_url, "postgres": postgres, "logs": str(tmp)}
    finally:
        for proc in reversed(procs):  # workers first, then the servers
            stop_tree(proc)


def stop_tree(proc: subprocess.Popen) -> None:
    """`stop_group`, then SIGKILL what the process had started in sessions of their own (a worker's flow-run
    processes, should a run still be going), each checked by psutil to be that very process."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop_group(proc, grace=15)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def sweep(cluster: dict[str, str], root: Path, *args: str, threads: int) -> tuple[float, str]:
    """`alignflow -m …` against the cluster on a fresh root: (wall seconds, its output); it must succeed."""
    env = cli_env(root, threads=threads, PREFECT_API_URL=cluster["prefect"], MLFLOW_TRACKING_URI=cluster["mlflow"],
                  PREFECT_SERVER_ANALYTICS_ENABLED="false")
    start = time.monotonic()
    done = subprocess.run([str(BIN / "alignflow"), "-m", "tracking=server", *args, *JOB, KL], cwd=root, env=env,
                          capture_output=True, text=True, timeout=420)
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    (root / "sweep.log").write_text(output)  # kept with the test's temporary files
    assert done.returncode == 0, output[-6000:]
    return seconds, output


@pytest.mark.cluster
def test_sweep_on_two_workers_shares_sft_tracks_in_postgres_and_beats_sequential(cluster, tmp_path):
    """The same 4 jobs (rl.kl_coef × 4 on one SFT and reward model), each sweep on a fresh root (nothing cached):
    dispatched to two workers (2 cores: 2 jobs at once, 1 thread each), then one after another in one process.

    The sequential sweep runs with 1 thread, not the 2 cores' worth: on tiny models 2 threads are no faster, and
    on this shared 2-core machine they oversubscribe (a PPO stage went from 19 s to 108 s), so 1 thread is the
    stronger baseline to beat."""
    import psycopg2
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (tmp_path / "sequential").mkdir()
    (tmp_path / "dispatched").mkdir()
    dispatched, output = sweep(cluster, tmp_path / "dispatched", "hydra/launcher=prefect", "hydra.launcher.cores=2",
                               "hydra.launcher.poll_seconds=1", threads=1)
    sequential, _ = sweep(cluster, tmp_path / "sequential", "tracking.experiment_name=sequential", "num_threads=1",
                          threads=1)
    print(f"\ndispatched sweep {dispatched:.1f}s, sequential sweep {sequential:.1f}s")
    assert "dispatching 4 jobs to work pool `alignflow` (process)" in output and "1 thread(s) each" in output

    client = MlflowClient(cluster["mlflow"])
    experiment = client.get_experiment_by_name("alignflow").experiment_id
    sweeps = client.search_runs([experiment], "tags.`alignflow.sweep` != ''")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED", output[-4000:]
    sweep_run = sweeps[0].info.run_id
    assert sweeps[0].data.tags.get("alignflow.verdict") and f"sweep run {sweep_run} finished" in output
    jobs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run}'")
    assert len(jobs) == 4 and {r.info.status for r in jobs} == {"FINISHED"}
    assert {r.data.params.get("rl.kl_coef") for r in jobs} == {"0.05", "0.1", "0.2", "0.4"}
    assert {r.data.params.get("num_threads") for r in jobs} == {"1"}  # 2 cores, 2 jobs at once

    stages = client.search_runs([experiment], "tags.`alignflow.stage` = 'sft'")
    assert sorted(r.data.tags["alignflow.cached"] for r in stages) == ["false", "true", "true", "true"]
    assert len([p for p in (tmp_path / "dispatched" / "artifacts" / "sft").iterdir() if p.is_dir()]) == 1
    assert client.list_artifacts(jobs[0].info.run_id, "")  # config.yaml & co. through the server's artifact proxy

    with psycopg2.connect(cluster["postgres"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid FROM runs WHERE experiment_id = %s", (int(experiment),))
        in_postgres = {row[0] for row in cursor.fetchall()}
    assert {sweep_run, *(r.info.run_id for r in jobs), *(r.info.run_id for r in stages)} <= in_postgres

    flow_runs = [r.data.tags["prefect.flow_run_id"] for r in jobs]
    with temporary_settings({PREFECT_API_URL: cluster["prefect"]}), get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_runs)))
        deployment = prefect.read_deployment_by_name("alignflow/sweep-job")
    assert len(runs) == 4 and all(r.state.is_completed() and r.deployment_id == deployment.id for r in runs)
    logs = {i: (Path(cluster["logs"]) / f"worker-{i}.log").read_text() for i in (1, 2)}
    assert all(any(run in log for run in flow_runs) for log in logs.values()), "both workers ran jobs"

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())  # another process's load shrinks what 2 jobs can gain
    assert dispatched < sequential, f"dispatched {dispatched:.1f}s is not below sequential {sequential:.1f}s " \
                                    f"(load average {load} on {os.cpu_count()} cores)"
