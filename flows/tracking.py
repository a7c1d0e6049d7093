"""MLflow run tree: experiment → (sweep run, flows.sweep) → pipeline run → one child run per stage.

Runs are created with explicit ids through MlflowClient, so nothing depends on MLflow's thread-local "active
run" across Prefect tasks; a stage body activates only its own child run (for `log_input`, tables, artifacts).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from flows import naming

REPO_DIR = Path(__file__).resolve().parent.parent
log = logging.getLogger("alignflow")
STACK = ["alignflow", "torch", "transformers", "trl", "datasets", "prefect", "hydra-core", "mlflow", "pandas"]


def init_tracking(tracking: dict[str, Any]) -> str:
    """Point MLflow at the configured store and return the experiment id (created with an explicit location).

    A new sqlite store is created (schema migrations) and the experiment looked up under a file lock beside the
    database: processes starting together on a fresh root would otherwise race in MLflow's schema set-up. With
    `artifact_root: null` (a tracking server) the server's own artifact store holds the experiment's artifacts.
    """
    if tracking["artifact_root"]:
        Path(tracking["artifact_root"]).mkdir(parents=True, exist_ok=True)
    if tracking["tracking_uri"].startswith("sqlite:///"):
        release_sqlite_on_stop()
    mlflow.set_tracking_uri(tracking["tracking_uri"])
    with _store_lock(tracking["tracking_uri"]):
        client = MlflowClient()
        name = tracking["experiment_name"]
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        if not tracking["artifact_root"]:
            return _create_experiment(client, name, None)
        return _create_experiment(client, name, (Path(tracking["artifact_root"]) / name).as_uri())


def release_sqlite_on_stop() -> None:
    """Make a stop (SIGTERM, Ctrl-C, Prefect's TerminationSignal) that lands inside a sqlite statement leave the
    store writable: a SQLAlchemy `handle_error` hook closes the interrupted cursor and rolls its transaction back.

    SQLAlchemy drops a connection a stop exception interrupted without closing its cursor, and Python's sqlite3
    keeps such a connection open, holding the database's lock, while the cursor lives. Every later write of the
    process (the FAILED statuses on the way out) then waited 20 s for the lock and failed: runs stayed RUNNING
    and the stopped process took minutes to exit (found in CI's SIGTERM test)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "handle_error", _release_interrupted_cursor):
        event.listen(Engine, "handle_error", _release_interrupted_cursor)


def _release_interrupted_cursor(context: Any) -> None:
    """`handle_error` listener: for a stop exception (not an `Exception`), close the sqlite cursor and roll back."""
    import sqlite3

    cursor = getattr(context.execution_context, "cursor", None)
    if isinstance(context.original_exception, Exception) or not isinstance(cursor, sqlite3.Cursor):
        return  # an ordinary error (SQLAlchemy closes the cursor itself), or another database's cursor
    with suppress(sqlite3.Error):
        connection = cursor.connection
        cursor.close()
        connection.rollback()


def _create_experiment(client: MlflowClient, name: str, location: str | None) -> str:
    """Create experiment `name`; when another process created it first (jobs starting together on a tracking
    server), return that one's id."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive lock beside a sqlite store (other stores handle concurrent writers themselves)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, from /proc), or '' where that cannot be read; with the
    pid it tells a live owner from a new process that reused the number."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_tags() -> dict[str, str]:
    """Who writes a run: host, pid and the pid's start time, so a later process can tell whether it is alive."""
    pid = os.getpid()
    return {"alignflow.host": socket.gethostname(), "alignflow.pid": str(pid),
            "alignflow.pid_start": _process_start(pid)}


def _owner_alive(tags: dict[str, str]) -> bool:
    pid = int(tags.get("alignflow.pid", "0") or 0)
    if pid <= 0:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _process_start(pid) == tags.get("alignflow.pid_start", "")


def reconcile_dead_runs(experiment_id: str) -> list[str]:
    """Mark RUNNING runs whose writing process on this host is gone as KILLED (and their Prefect flow runs as
    crashed); returns their ids. Runs of other hosts are left alone: nothing here can see their processes."""
    client = MlflowClient()
    host = socket.gethostname()
    dead = [r for r in client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                          f"tags.`alignflow.host` = '{host}'", max_results=1000)
            if not _owner_alive(r.data.tags)]
    for run in dead:
        reason = f"process {run.data.tags.get('alignflow.pid')} on {host} ended without closing this run"
        client.set_tag(run.info.run_id, "alignflow.end_reason", reason)
        client.set_terminated(run.info.run_id, "KILLED")
        flow_run_id = run.data.tags.get("prefect.flow_run_id")
        if flow_run_id:
            _crash_flow_run(flow_run_id, reason)
    if dead:
        log.warning("marked %d run(s) of dead processes KILLED", len(dead))
    return [r.info.run_id for r in dead]


def _crash_flow_run(flow_run_id: str, reason: str) -> None:
    """Set a Prefect flow run that is still running to Crashed (best effort: its server may be another one)."""
    from prefect import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
    except Exception as err:  # noqa: BLE001 - the run may live in another Prefect database
        log.debug("could not mark Prefect flow run %s crashed: %s", flow_run_id, err)


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into dotted keys for MLflow params."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def git_commit() -> str:
    """The repository's current commit (with '-dirty' for uncommitted changes), or 'unknown'."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)

    try:
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    """Installed versions of the stack, logged with every pipeline run."""
    found = {}
    for name in STACK:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def start_pipeline_run(experiment_id: str, cfg: dict[str, Any], overrides: list[str], tags: dict[str, str],
                       parent_run_id: str | None) -> str:
    """Create the pipeline's parent run with params, composed YAML, git commit and package versions."""
    client = MlflowClient()
    all_tags = {"alignflow.pipeline": cfg["pipeline"]["name"], "alignflow.overrides": json.dumps(overrides),
                "mlflow.source.git.commit": git_commit(), **owner_tags(), **tags}
    swept = None
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
        keys = client.get_run(parent_run_id).data.tags.get("alignflow.sweep.keys")
        swept = json.loads(keys) if keys else None  # a sweep job is named by what the sweep varies
    run_name = naming.run_name(cfg["pipeline"]["name"], overrides, swept)
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    # A few params (what this run overrides, the headline knobs); the full config is the config.yaml artifact.
    params = [mlflow.entities.Param(k, v) for k, v in naming.run_params(cfg, overrides).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (Path(tmp) / "packages.json").write_text(json.dumps(package_versions(), indent=2))
        client.log_artifact(run.info.run_id, str(Path(tmp) / "config.yaml"))
        client.log_artifact(run.info.run_id, str(Path(tmp) / "packages.json"))
    return run.info.run_id


def end_run(run_id: str, ok: bool) -> None:
    """Close a run created by this module."""
    MlflowClient().set_terminated(run_id, "FINISHED" if ok else "FAILED")


@contextmanager
def stage_run(experiment_id: str, parent_run_id: str, stage: str, key: str, cached: bool,
              source_run_id: str | None = None) -> Iterator[str]:
    """A child run for one stage, active (fluent API) inside the block; FAILED if the block raises."""
    tags = {"mlflow.parentRunId": parent_run_id, "alignflow.stage": stage, "alignflow.key": key,
            "alignflow.cached": str(cached).lower(), **owner_tags()}
    if source_run_id:
        tags["alignflow.source_run"] = source_run_id
    run_id = MlflowClient().create_run(experiment_id, run_name=stage, tags=tags).info.run_id
    mlflow.start_run(run_id=run_id)
    try:
        yield run_id
    except BaseException as err:
        try:
            mlflow.set_tag("alignflow.end_reason", f"{type(err).__name__}: {' '.join(str(err).split())}"[:5000])
            mlflow.end_run("FAILED")
        except Exception as store_err:  # the store itself failed (full disk): the next start closes the run
            log.warning("could not close the MLflow run %s: %s", run_id, store_err)
        raise
    mlflow.end_run()


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log plain numbers to a run (skipping non-numeric values)."""
    now = int(time.time() * 1000)
    entities = [mlflow.entities.Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool)]
    if entities:
        MlflowClient().log_batch(run_id, metrics=entities)
