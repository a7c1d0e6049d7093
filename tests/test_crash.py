"""Kill -9 in every stage, SIGTERM, and four jobs at once: the store stays consistent and a rerun resumes.

Marker `crash` (run by .ci/run after the default suite): each case starts the real CLI in fresh processes.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import TINY as HELPER_TINY
from tests.helpers import cli_env

pytestmark = pytest.mark.crash

REPO = Path(__file__).resolve().parent.parent
TINY = [*HELPER_TINY, "rl.total_updates=4"]
STAGES = ["data", "sft", "reward", "ppo", "eval"]


def start(root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *TINY, *extra], cwd=REPO, env=cli_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_stage(root: Path, stage: str, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The stage's directory once it exists without a DONE marker (the stage is running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (root / "artifacts" / stage).glob("*"):
            if path.is_dir() and not (path / "DONE").exists():
                return path
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    raise AssertionError(f"stage {stage} never started")


def final_metrics(out: str, root: Path) -> dict[str, float]:
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = client.search_runs(client.search_experiments()[0].experiment_id,
                              filter_string="tags.`alignflow.stage` = 'eval'", order_by=["start_time DESC"])
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"]).data.metrics
    merged = {**runs[0].data.metrics, **parent}  # eval's headline lives on the pipeline run, the rest on its own
    volatile = ("eval/seconds", "eval/peak_rss_gib")  # timing and memory differ from run to run
    return {k: v for k, v in merged.items() if k.startswith("eval/") and k not in volatile}


def statuses(root: Path) -> dict[str, int]:
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return counts


def prefect_states(root: Path) -> dict[str, int]:
    db = root / ".alignflow" / "prefect" / "prefect.db"
    with sqlite3.connect(db) as con:
        return dict(con.execute("select state_type, count(*) from flow_run group by state_type").fetchall())


def test_kill_9_in_every_stage_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    root = tmp_path / "killed"
    # The uninterrupted run goes on beside the killed ones (one torch thread each, two cores); a thread drains its
    # output so that a full pipe never stalls it, and the pool waits for it should the kills fail first.
    with ThreadPoolExecutor(1) as pool:
        uninterrupted = pool.submit(lambda: finish(start(reference)))
        for stage in STAGES:
            proc = start(root)
            stage_dir = wait_for_stage(root, stage, proc)
            servers = [c for c in children(proc.pid) if "uvicorn" in Path(f"/proc/{c}/cmdline").read_text()]
            proc.send_signal(signal.SIGKILL)  # the main process only, as the OOM killer or `kill -9` would
            proc.wait()
            assert not (stage_dir / "DONE").exists(), f"{stage} finished before the kill"
            assert servers, "the temporary Prefect server was not found"
            deadline = time.monotonic() + 15
            while any(alive(s) for s in servers) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not any(alive(s) for s in servers), "the temporary Prefect server outlived its parent"
        expected = final_metrics(uninterrupted.result(), reference)
    out = finish(start(root))
    assert final_metrics(out, root) == expected  # resumed from the kills, identical to the uninterrupted run
    counts = statuses(root)
    assert "RUNNING" not in counts and counts.get("KILLED", 0) >= len(STAGES), counts
    assert "RUNNING" not in prefect_states(root)


def test_sigterm_ends_runs_failed_and_stops_the_server(tmp_path):
    proc = start(tmp_path)
    wait_for_stage(tmp_path, "sft", proc)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    deadline = time.monotonic() + 60
    while not client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 filter_string="tags.`alignflow.stage` = 'sft'") and time.monotonic() < deadline:
        time.sleep(0.2)  # the stage's own run opens just after its directory
    servers = [c for c in children(proc.pid) if "uvicorn" in Path(f"/proc/{c}/cmdline").read_text()]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out[-3000:]
    time.sleep(1)
    assert servers and not any(alive(s) for s in servers), out[-2000:]
    counts = statuses(tmp_path)
    assert counts == {"FINISHED": 1, "FAILED": 2}, counts  # data finished; the pipeline run and sft ended FAILED


def test_four_jobs_at_once_on_a_fresh_root_all_finish(tmp_path):
    procs = [start(tmp_path, f"rl.kl_coef={kl}") for kl in (0.1, 0.2, 0.3, 0.4)]
    for proc in procs:
        finish(proc, timeout=1200)
    assert len(list((tmp_path / "artifacts" / "sft").glob("*/DONE"))) == 1  # one SFT, shared by all four
    assert len(list((tmp_path / "artifacts" / "ppo").glob("*/DONE"))) == 4
    counts = statuses(tmp_path)
    assert counts == {"FINISHED": counts["FINISHED"]}, counts
    done = json.loads(next((tmp_path / "artifacts" / "sft").glob("*/DONE")).read_text())
    assert done["manifest"]["files"]  # the shared stage recorded what it produced
