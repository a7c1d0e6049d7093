"""A throwaway sweep cluster on this machine, for the `cluster` test and `benchmarks/bench_sweep.py`.

`postgres()` starts a PostgreSQL cluster (initdb, pg_ctl) on a free port with an empty database `mlflow`;
`sweep_cluster()` starts an MLflow server on it, a Prefect server, the process work pool `alignflow` and two
workers; `run_sweep()` runs one `alignflow -m …` against them. Everything is stopped and deleted on exit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import TINY, cli_env, free_port, stop_group, wait_healthy

BIN = Path(sys.executable).parent
#: The swept knob: 4 jobs sharing one SFT and reward model.
KL = "rl.kl_coef=0.05,0.1,0.2,0.4"
#: TINY with no fixed num_threads and more PPO updates (the part of each job that runs in parallel; each job's
#: fixed cost, a fresh process, is ~20 s here): the test runs 40, the benchmark 96.
JOB = [o for o in TINY if not o.startswith(("num_threads=", "rl.total_updates="))]
TEST_UPDATES, BENCH_UPDATES = 40, 96


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: there, run its binaries as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        raise RuntimeError(f"`{name}` not found: install PostgreSQL's server binaries (Debian: apt-get install "
                           "postgresql)")
    return str(found)


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 and a free port with an empty database `mlflow`: its URI."""
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


@contextlib.contextmanager
def sweep_cluster(postgres_uri: str, tmp: Path) -> Iterator[dict[str, str]]:
    """An MLflow server on the PostgreSQL store, a Prefect server, work pool `alignflow` (process) and two
    workers (one run at a time each), logs under `tmp`; every process stopped at the end."""
    mlflow_url, prefect_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/api"
    env = cli_env(PREFECT_HOME=str(tmp / "prefect"), PREFECT_API_URL=prefect_url, PREFECT_UI_API_URL=prefect_url,
                  PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_TRACKING_URI=mlflow_url,
                  PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
    servers: list[subprocess.Popen] = []
    workers: list[subprocess.Popen] = []

    def start(group: list[subprocess.Popen], name: str, *cmd: str) -> tuple[subprocess.Popen, Path]:
        log = tmp / f"{name}.log"
        with log.open("w") as out:
            group.append(subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=tmp))
        return group[-1], log

    try:
        store = postgres_uri.replace("postgresql://", "postgresql+psycopg2://")  # SQLAlchemy 2.1's default: psycopg 3
        mlflow = start(servers, "mlflow", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
                       str(tmp / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", mlflow_url.rsplit(":", 1)[1],
                       "--workers", "1")
        prefect = start(servers, "prefect", "prefect", "server", "start", "--host", "127.0.0.1",
                        "--port", prefect_url.rsplit(":", 1)[1].removesuffix("/api"))
        wait_healthy(f"{prefect_url}/health", *prefect, 180, "prefect server")
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "alignflow", "--type", "process"], env=env,
                       check=True, capture_output=True, cwd=tmp)
        for i in (1, 2):
            start(workers, f"worker-{i}", "prefect", "worker", "start", "--pool", "alignflow", "--limit", "1",
                  "--name", f"worker-{i}")
        wait_healthy(f"{mlflow_url}/health", *mlflow, 180, "mlflow server")
        yield {"mlflow": mlflow_url, "prefect": prefect_url, "postgres": postgres_uri, "logs": str(tmp)}
    finally:  # the workers together (each warned first), then the servers together
        for group, warn_first in ((workers, True), (servers, False)):
            with ThreadPoolExecutor(max(1, len(group))) as pool:
                list(pool.map(functools.partial(stop_tree, warn_first=warn_first), group))


def stop_tree(proc: subprocess.Popen, warn_first: bool = False) -> None:
    """`stop_group`, then SIGKILL what the process had started in sessions of their own (a worker's flow-run
    processes, should a run still be going), each checked by psutil to be that very process.

    `warn_first`: a SIGTERM and a second's wait before `stop_group`'s, for a Prefect worker. One that has run flows
    does not end on one signal (3.9.1: its CLI asks the worker to stop, which it had not done 15 s later, after the
    sweeps here); a second makes the CLI kill it at once."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if warn_first:
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=1)
    stop_group(proc, grace=15)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


SWEEP_TIMEOUT = 1200  # a hang guard, not a speed check: on a 2-core AVX2 EPYC the dispatched sweep took over 420 s


def run_sweep(cluster: dict[str, str], root: Path, *args: str, threads: int,
              updates: int = TEST_UPDATES) -> tuple[float, str, int]:
    """`alignflow -m tracking=server …` (JOB with `updates` PPO updates, and the KL sweep) against the cluster on
    `root`: (wall seconds, its output, its exit status); the output is kept in `root/sweep.log`."""
    env = cli_env(root, threads=threads, PREFECT_API_URL=cluster["prefect"], MLFLOW_TRACKING_URI=cluster["mlflow"],
                  PREFECT_SERVER_ANALYTICS_ENABLED="false")
    start = time.monotonic()
    command = [str(BIN / "alignflow"), "-m", "tracking=server", *args, *JOB, f"rl.total_updates={updates}", KL]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT)
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    (root / "sweep.log").write_text(output)
    return seconds, output, done.returncode


#: The two sweeps compared: (name, extra arguments, torch threads per job).
DISPATCHED = ("hydra/launcher=prefect", "hydra.launcher.cores=2", "hydra.launcher.poll_seconds=1")
SEQUENTIAL = ("tracking.experiment_name=sequential", "num_threads=1")
