"""Crash-consistent tracking: a store created by many processes at once, and runs of dead processes closed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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
