"""Scheduled deployments (`alignflow-serve`) and what a Prefect flow run of the pipeline shows.

The schedule checks run in the default suite (no server). The `server` case (marker `server`, run by
`make test-server`) starts a real `prefect server` on 127.0.0.1 with a temporary home, serves a deployment from
a test schedule file, triggers it through the API and checks the finished run: its name, tags, log lines, the
summary artifact and its MLflow run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flows.naming import run_name
from flows.prefect_run import SUMMARY_KEY, mlflow_run_link, pipeline_of
from flows.serve import NO_SERVER, ScheduleError, check_overrides, load_schedule, main
from tests.helpers import TINY, cli_env, free_port, stop_group, wait_healthy

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = ["data", "sft", "reward", "ppo", "eval"]


def write_schedule(path: Path, *deployments: dict, limit: int | None = 1) -> Path:
    path.write_text(yaml.safe_dump({"limit": limit, "deployments": list(deployments)}))
    return path


def test_nightly_schedule_checks_out_without_a_server(capsys):
    """conf/schedule/nightly.yaml parses, every deployment's overrides compose and validate (--dry-run)."""
    main(["nightly", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    deployments, limit = load_schedule("nightly")
    assert len(lines) == len(deployments) >= 2 and limit == 1
    assert all(line.startswith("alignflow/") and "cron " in line for line in lines)


def test_serve_refuses_an_ephemeral_server(tmp_path, capsys):
    """Without PREFECT_API_URL nothing is served: one line naming the problem and the fix, exit status 2."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    path = write_schedule(tmp_path / "s.yaml", {"name": "d", "interval": 60, "overrides": ["rl.kl_coef=0.1"]})
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SystemExit) as exit_info:
        main([str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Cannot schedule flows on an ephemeral server" in err and NO_SERVER in err


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "d", "overrides": []}, "give exactly one of `cron`"),
    ({"name": "d", "cron": "0 2 * * *", "interval": 60}, "give exactly one of `cron`"),
    ({"name": "d", "cron": "61 * * * *"}, 'Invalid cron string: "61 * * * *"'),
    ({"name": "d", "cron": "0 2 * * *", "timezone": "Mars/Base"}, 'Invalid timezone: "Mars/Base"'),
    ({"name": "d", "interval": 0}, "interval = 0 is invalid: use a number of seconds > 0"),
    ({"name": "a/b", "interval": 60}, "name = 'a/b' is invalid"),
    ({"name": "d", "interval": 60, "overrides": "rl.kl_coef=0.1"}, "overrides = 'rl.kl_coef=0.1' is invalid"),
    ({"name": "d", "interval": 60, "cronn": "0 2 * * *"}, "unknown field(s) cronn"),
    ({"name": "d", "interval": 60, "overrides": ["sft.args.num_train_epochs=0"]},
     "deployment `d`: config field `sft.args.num_train_epochs` = 0 is invalid"),
    ({"name": "d", "interval": 60, "overrides": ["rl=nope"]}, "deployment `d`: In 'config': Could not find 'rl/nope'"),
])  # fmt: skip
def test_bad_schedule_entries_fail_in_one_line(tmp_path, entry, message):
    path = write_schedule(tmp_path / "s.yaml", entry)
    with pytest.raises(ScheduleError) as err:
        for deployment in load_schedule(str(path))[0]:
            check_overrides(deployment)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_schedule_names_repeat_and_unknown_files(tmp_path):
    path = write_schedule(tmp_path / "s.yaml", {"name": "d", "interval": 60}, {"name": "d", "interval": 90})
    with pytest.raises(ScheduleError, match="deployment names repeat"):
        load_schedule(str(path))
    with pytest.raises(ScheduleError, match=r"no file .*nope.yaml; use one of conf/schedule/ \(.*nightly"):
        load_schedule("nope")


def test_mlflow_link_is_a_url_for_a_tracking_server():
    assert mlflow_run_link("http://mlflow:5000/", "3", "abc") == (
        "MLflow run: [abc](http://mlflow:5000/#/experiments/3/runs/abc)")
    local = mlflow_run_link("sqlite:////s/mlflow.db", "3", "abc")
    assert "`abc`" in local and "mlflow ui --backend-store-uri sqlite:////s/mlflow.db" in local
    assert "http://127.0.0.1:5000/#/experiments/3/runs/abc" in local



def test_flow_run_is_named_after_the_pipeline_its_overrides_select():
    """The pipeline comes from the composed config (a bad override names the run `alignflow`; the flow then
    fails with the real message)."""
    assert pipeline_of({"overrides": ["pipeline=dpo", "dpo.args.beta=0.2"]}) == "dpo"
    assert pipeline_of({"overrides": []}) == "rlhf"
    assert pipeline_of({"config": {"pipeline": {"name": "cai"}}, "overrides": ["x=1"]}) == "cai"
    assert pipeline_of({"overrides": ["rl=nope"]}) == "alignflow"


# ------------------------------------------------------------------------------------------- a real server
def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group this test started (the process and its children), then SIGKILL what is left."""
    stop_group(proc, grace)


def clean_env(**extra: str) -> dict[str, str]:
    return cli_env(PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`prefect server start` on 127.0.0.1 and a free port, with its own PREFECT_HOME; stopped at the end."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=clean_env(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_UI_API_URL=url,
                                          PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2"),  # plans soon
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{url}/health", proc, home / "server.log", 120, "prefect server")
        yield url, home
    finally:
        stop(proc)
        log.close()


@pytest.fixture
def served(prefect_server, tmp_path) -> Iterator[tuple[str, Path, Path, subprocess.Popen]]:
    """`alignflow-serve` (as `python -m flows.serve`) serving a test schedule against the server."""
    url, home = prefect_server
    root = tmp_path / "root"
    schedule = write_schedule(tmp_path / "test_schedule.yaml", {
        "name": "test-nightly", "cron": "0 3 * * *", "timezone": "UTC", "overrides": TINY, "tags": ["test-schedule"]})
    out = tmp_path / "serve.log"
    with out.open("w") as log:
        env = clean_env(PREFECT_HOME=str(home), PREFECT_API_URL=url, ALIGNFLOW_ROOT=str(root),
                        PREFECT_RUNNER_POLL_FREQUENCY="1")
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve", str(schedule)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield url, root, out, proc
    finally:
        stop(proc)


def wait_for_deployment(client, name: str, proc: subprocess.Popen, out: Path, timeout: float = 120):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, out.read_text()[-3000:]
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            time.sleep(1)
    raise AssertionError(f"deployment {name} never appeared:\n{out.read_text()[-3000:]}")


def next_scheduled(client, deployment_id, timeout: float = 60):
    """The first run the server's scheduler planned for a deployment (it plans ahead, on its loop)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    scheduled = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
                              state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(flow_run_filter=scheduled)
        if runs:
            return min(runs, key=lambda r: r.expected_start_time)
        time.sleep(1)
    raise AssertionError("the scheduler planned no run for the deployment")


def read_logs_until(client, log_filter, line_start: str, timeout: float = 60) -> list:
    """Every log of a run, page by page (the API returns at most 200 per call), polled until one starting
    with `line_start` is in: the runner ships logs in batches, so the last lines can land after the run ends."""
    deadline = time.monotonic() + timeout
    while True:
        logs, page = [], None
        while page is None or len(page) == 200:
            page = client.read_logs(log_filter, limit=200, offset=len(logs))
            logs += page
        if any(entry.message.startswith(line_start) for entry in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


@pytest.mark.server
def test_served_deployment_runs_named_tagged_logged_and_tracked(served):
    """A scheduled deployment on a real server, triggered through the API, completes as one pipeline run:
    named after the pipeline and overrides, tagged, with alignflow's log lines (printed once), the summary
    table artifact linking the MLflow run, and that MLflow run tagged with the flow run's id."""
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, root, out, proc = served
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        deployment = wait_for_deployment(client, "alignflow/test-nightly", proc, out)
        assert deployment.schedules[0].schedule.cron == "0 3 * * *" and deployment.schedules[0].active
        assert deployment.parameters == {"overrides": TINY}
        assert {"alignflow", "rlhf", "test-schedule"} <= set(deployment.tags)

        run = run_deployment("alignflow/test-nightly", timeout=240, poll_interval=2)
        assert run.state is not None and run.state.is_completed(), (run.state, out.read_text()[-4000:])
        assert run.name == run_name("rlhf", TINY) and run.name.startswith("rlhf experiment=smoke n_sft=300")
        assert {"alignflow", "rlhf", "test-schedule"} <= set(run.tags)

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        logs = read_logs_until(client, LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                               "pipeline rlhf finished after")
        planned = next_scheduled(client, deployment.id)  # the cron schedule at work: next 03:00 UTC
        assert (planned.expected_start_time.hour, planned.expected_start_time.minute) == (3, 0)
        assert planned.parameters == {"overrides": TINY} and "test-schedule" in planned.tags

    mlflow = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    experiment = mlflow.get_experiment_by_name("alignflow").experiment_id
    found = mlflow.search_runs([experiment], filter_string=f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert found[0].data.tags["alignflow.pipeline"] == "rlhf"
    assert found[0].info.run_name == run.name  # one name in Prefect and in MLflow

    table = [a for a in artifacts if a.key == SUMMARY_KEY]
    assert len(table) == 1 and table[0].type == "table", artifacts
    assert found[0].info.run_id in table[0].description and "finished" in table[0].description
    assert '"stage": "eval"' in str(table[0].data) or "'stage': 'eval'" in str(table[0].data)

    ours = [entry.message for entry in logs if entry.name == "alignflow"]
    assert any(m.startswith("[data] done") for m in ours), [e.message[:80] for e in logs]
    assert any(m.startswith("pipeline rlhf finished after") for m in ours)
    printed = out.read_text()
    assert printed.count("pipeline rlhf finished after") == 1, printed[-4000:]  # once in the terminal
