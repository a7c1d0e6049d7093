"""The human feedback loop through real servers (marker feedback_loop, `make test-feedback`).

A Label Studio server (its own virtualenv, `make label-studio-deps`) and a Prefect server run on 127.0.0.1. The
pipeline with `feedback=human_loop` samples K responses per prompt from SFT, sends a budget of them to Label Studio
and pauses its flow run. Simulated annotators rank the tasks through Label Studio's API
(`alignflow-feedback simulate`), `alignflow-feedback resume` resumes the run, and the reward model trains on the
pairs those rankings give, each with its annotator. A rerun asks for nothing already ranked; a second round with a
larger budget sends only new items, and its reward model has one head per annotator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from components.label_studio import RankingProject
from tests.helpers import cli_env, free_port, stop_group, wait_healthy
from tests.test_serve import prefect_server  # noqa: F401  (the module-scoped server fixture)

pytestmark = pytest.mark.feedback_loop

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "alignflow-test-token-0123456789"
PROJECT = "alignflow feedback test"
BUDGET = 8
K = 4
RUN = ["experiment=smoke", "feedback=human_loop", "feedback.n_candidates=48", f"feedback.n_responses={K}",
       "rl.total_updates=4", "eval.max_prompts=32", "registry.enabled=false", "num_threads=1",
       f"feedback.label_studio.project={PROJECT}", "feedback.wait.poll_seconds=1"]


def label_studio_bin() -> Path:
    """The `label-studio` executable: $LABEL_STUDIO_BIN, else the project's .venv-labelstudio."""
    return Path(os.environ.get("LABEL_STUDIO_BIN", REPO / ".venv-labelstudio" / "bin" / "label-studio"))


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[str]:
    """`label-studio start` on 127.0.0.1 and a free port with a fresh data dir and an admin whose token is TOKEN."""
    exe = label_studio_bin()
    assert exe.is_file(), f"{exe} is missing: run `make label-studio-deps`"
    data = tmp_path_factory.mktemp("label_studio")
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "DJANGO_DB": "sqlite"}
    user = ["--username", "admin@alignflow.local", "--password", "alignflow-test", "--user-token", TOKEN,
            "--enable-legacy-api-token", "--data-dir", str(data), "-q"]
    subprocess.run([str(exe), "init", *user], env=env, check=True, capture_output=True, timeout=300)
    log = (data / "server.log").open("w")
    proc = subprocess.Popen([str(exe), "start", "--data-dir", str(data), "--host", f"http://127.0.0.1:{port}",
                             "--internal-host", "127.0.0.1", "-p", str(port), "--no-browser"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", proc, data / "server.log", 180, "label-studio")
        yield url
    finally:
        stop_group(proc)
        log.close()


def start_pipeline(root: Path, env: dict[str, str], overrides: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "alignflow"), *RUN, *overrides], cwd=REPO, env=env,
                            stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def paused_run(api: str, proc: subprocess.Popen, out: Path, timeout: float = 400) -> str:
    """The id of the pipeline's flow run once it is Paused (asked of the server's REST API)."""
    deadline = time.monotonic() + timeout
    query = {"flow_runs": {"state": {"name": {"any_": ["Paused"]}}}}
    while True:
        assert proc.poll() is None, out.read_text()[-4000:]
        assert time.monotonic() < deadline, "the flow run did not pause:\n" + out.read_text()[-4000:]
        runs = httpx.post(f"{api}/flow_runs/filter", json=query, timeout=10).raise_for_status().json()
        if runs:
            return runs[0]["id"]
        time.sleep(2)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            stop_group(proc)
    text = out.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def stage_metrics(root: Path, stage: str) -> dict[str, float]:
    """The latest `stage` run's metrics, with its headline metrics (logged on the pipeline run above it)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    run = client.search_runs(experiments, f"tags.`alignflow.stage` = '{stage}'",
                             order_by=["attributes.start_time DESC"])[0]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"]).data.metrics
    return {**{k: v for k, v in parent.items() if k.startswith(f"{stage}/")}, **run.data.metrics,
            "cached": float(run.data.tags.get("alignflow.cached") == "true")}


def test_rank_in_label_studio_resume_and_train(label_studio, prefect_server, tmp_path):  # noqa: F811
    api, home = prefect_server
    root = tmp_path / "root"
    env = cli_env(root, LABEL_STUDIO_API_KEY=TOKEN, PREFECT_API_URL=api, PREFECT_HOME=str(home),
                  PREFECT_SERVER_ANALYTICS_ENABLED="false")
    base = [f"feedback.label_studio.url={label_studio}", f"feedback.budget={BUDGET}"]
    out = tmp_path / "first.log"
    proc = start_pipeline(root, env, base, out)
    run_id = paused_run(api, proc, out)
    project = RankingProject(label_studio, TOKEN, PROJECT)
    tasks = list(project.tasks())
    assert len(tasks) == BUDGET and all(len(t.data["items"]) == K for t in tasks)
    assert not project.rankings()  # nobody has ranked yet: the run waits

    subprocess.run([str(BIN / "alignflow-feedback"), "simulate", f"feedback.label_studio.url={label_studio}",
                    f"feedback.label_studio.project={PROJECT}"], env=env, check=True, timeout=300)
    subprocess.run([str(BIN / "alignflow-feedback"), "resume", run_id], env=env, check=True, timeout=120)
    finish(proc, out)

    rankings = project.rankings()
    assert len(rankings) == BUDGET and len({r["annotator"] for r in rankings}) == 3
    feedback = stage_metrics(root, "feedback")
    assert feedback["feedback/n_rankings"] == BUDGET and feedback["feedback/n_annotators"] == 3
    assert feedback["feedback/n_pairs"] == BUDGET * K * (K - 1) // 2
    assert feedback["feedback/agreement_with_gold"] > 0.5  # the profiles mostly agree with the task's gold
    reward = stage_metrics(root, "reward")
    assert not reward["cached"] and "reward/eval_accuracy" in reward
    store = root / "artifacts" / "feedback_labels" / "rankings.jsonl"
    stored = [json.loads(line) for line in store.read_text().splitlines()]
    assert len(stored) == BUDGET and all(r["annotator"].endswith("@annotators.local") for r in stored)

    # The same run again: every item is ranked, so nothing is sent and nothing waits.
    again = tmp_path / "again.log"
    finish(start_pipeline(root, env, base, again), again, timeout=300)
    assert len(list(project.tasks())) == BUDGET and "waiting" not in again.read_text()

    # A second round with a larger budget sends only items nobody ranked.
    second = tmp_path / "second.log"
    proc = start_pipeline(root, env, [f"feedback.label_studio.url={label_studio}",
                                      f"feedback.budget={2 * BUDGET}", "feedback.wait.mode=poll",
                                      "reward.conditioning=per_annotator"], second)  # a head per ranker
    deadline = time.monotonic() + 300
    while len(list(project.tasks())) < 3 * BUDGET:
        assert proc.poll() is None and time.monotonic() < deadline, second.read_text()[-4000:]
        time.sleep(2)
    subprocess.run([str(BIN / "alignflow-feedback"), "simulate", f"feedback.label_studio.url={label_studio}",
                    f"feedback.label_studio.project={PROJECT}"], env=env, check=True, timeout=300)
    finish(proc, second)
    request = stage_metrics(root, "feedback_request")
    assert request["feedback_request/n_already_ranked"] == BUDGET
    assert request["feedback_request/n_sent"] == 2 * BUDGET
    assert len(project.rankings()) == 3 * BUDGET
    assert stage_metrics(root, "feedback")["feedback/n_rankings"] == 3 * BUDGET
    assert "reward/eval_accuracy" in stage_metrics(root, "reward")  # trained with one head per annotator
