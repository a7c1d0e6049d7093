"""Crash-consistent tracking: a store created by many processes at once, and runs of dead processes closed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from flows.tracking import init_tracking, owner_tags, reconcile_dead_runs


def _tracking(root) -> dict:
    return {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "artifact_root": str(root / "mlruns" / "artifacts"),
            "experiment_name": "alignflow"}


def test_runs_of_dead_processes_end_killed_and_live_ones_stay(tmp_path):
    experiment = init_tracking(_tracking(tmp_path))
    client = MlflowClient()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    dead_tags = {"alignflow.host": socket.gethostname(), "alignflow.pid": str(gone.pid), "alignflow.pid_start": "1"}
    dead = client.create_run(experiment, tags=dead_tags).info.run_id
    reused = client.create_run(experiment, tags={**owner_tags(), "alignflow.pid_start": "0"}).info.run_id
    live = client.create_run(experiment, tags=owner_tags()).info.run_id
    other_host = client.create_run(experiment, tags={**dead_tags, "alignflow.host": "elsewhere"}).info.run_id

    closed = reconcile_dead_runs(experiment)

    assert set(closed) == {dead, reused}  # a live pid with another start time is a reused number: its owner died
    assert client.get_run(dead).info.status == "KILLED"
    assert f"process {gone.pid}" in client.get_run(dead).data.tags["alignflow.end_reason"]
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(other_host).info.status == "RUNNING"  # another host's processes are not visible here


def test_a_fresh_store_opened_by_four_processes_at_once(tmp_path):
    """MLflow's sqlite schema set-up raced ("table secrets already exists") before the store lock."""
    code = ("import sys, json; from flows.tracking import init_tracking; "
            "print(init_tracking(json.loads(sys.argv[1])))")
    import json

    arg = json.dumps(_tracking(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-500:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, found or created once


@pytest.mark.parametrize("statement", ["INSERT INTO metrics", "SELECT"])
def test_a_stop_inside_a_sqlite_statement_leaves_the_store_writable(tmp_path, statement):
    """Found in CI: SIGTERM landed inside one of MLflow's sqlite statements; the interrupted connection kept the
    database locked, so the FAILED statuses on the way out each waited 20 s and failed, and the runs stayed
    RUNNING. Here the stop exception is raised right after the statement executes, where the signal landed."""
    import sqlite3

    import mlflow
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    tracking = _tracking(tmp_path)
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    run = client.create_run(init_tracking(tracking)).info.run_id
    fired = []

    def stop(conn, cursor, sql, params, context, executemany):
        if sql.startswith(statement) and not fired:
            fired.append(sql)
            raise SystemExit(143)  # what SIGTERM raises (flows.lifecycle); Prefect's TerminationSignal alike

    event.listen(Engine, "after_cursor_execute", stop)
    try:
        with pytest.raises(SystemExit):
            client.log_batch(run, metrics=[mlflow.entities.Metric("a", 1.0, 0, 0)])
    finally:
        event.remove(Engine, "after_cursor_execute", stop)
    assert fired
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db", timeout=1) as other:  # another process could write now
        other.execute("BEGIN EXCLUSIVE")
        other.rollback()
    client.set_terminated(run, "FAILED")
    assert client.get_run(run).info.status == "FAILED"
