"""The MLflow UI, as a person sees it, after a tiny sweep: checked in a real headless browser (Debian chromium).

Marker `browser` (run by .ci/run after installing chromium): a three-job `alignflow -m` sweep, then `mlflow server`
over its store on 127.0.0.1, then chromium renders the pages (DOM dumped after the app ran, screenshots saved
under the test's tmp dir and, when ALIGNFLOW_SCREENSHOTS is set, copied there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import TINY as HELPER_TINY
from tests.helpers import cli_env, free_port, stop_group

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
TINY = [*HELPER_TINY, "registry.margin=0.0"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "-m", "rl.kl_coef=0.05,0.2,0.4", *TINY], cwd=REPO,
                          env=cli_env(root), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def mlflow_ui(swept):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{swept}/mlruns/mlflow.db", "--default-artifact-root", str(swept / "mlruns" / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=swept, env=cli_env(swept), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        stop_group(server)


def render(url: str, shot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
              f"--user-data-dir={shot.parent / 'chromium-profile'}", "--virtual-time-budget=20000"]
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    if os.environ.get("ALIGNFLOW_SCREENSHOTS"):
        Path(os.environ["ALIGNFLOW_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["ALIGNFLOW_SCREENSHOTS"]) / shot.name)
    return dom


@pytest.fixture(scope="module")
def store(swept):
    client = MlflowClient(f"sqlite:///{swept}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("alignflow").experiment_id
    sweep = client.search_runs([experiment], filter_string="tags.`alignflow.sweep` != ''")
    assert len(sweep) == 1
    return client, experiment, sweep[0]


def test_the_sweep_run_is_finished_with_its_verdict_and_jobs_named_by_what_differs(mlflow_ui, store, tmp_path):
    client, experiment, sweep = store
    assert sweep.info.status == "FINISHED"
    dom = render(f"{mlflow_ui}/#/experiments/{experiment}/runs/{sweep.info.run_id}", tmp_path / "sweep_run.png")
    assert "Finished" in dom and sweep.info.run_name in dom
    assert "alignflow.verdict" in dom  # the verdict tag is on the run's page
    for kl in ("0.05", "0.2", "0.4"):  # its child runs, listed on its page, say what differs
        assert f"rlhf kl_coef={kl}<" in dom


@pytest.mark.parametrize("plot", ["frontier", "overoptimization"])
def test_the_sweep_plots_show_in_the_artifact_view(mlflow_ui, store, tmp_path, plot):
    client, experiment, sweep = store
    files = {Path(a.path).name for a in client.list_artifacts(sweep.info.run_id, "compare")}
    assert {"compare.csv", "compare.html", "verdict.txt", f"{plot}.png"} <= files
    url = f"{mlflow_ui}/#/experiments/{experiment}/runs/{sweep.info.run_id}/artifacts/compare/{plot}.png"
    dom = render(url, tmp_path / f"{plot}.png")
    assert f'<img alt="compare/{plot}.png" src="blob:' in dom  # the UI fetched the image and shows it
    assert (tmp_path / f"{plot}.png").stat().st_size > 20_000


def test_the_registered_policy_shows_the_champion_alias(mlflow_ui, store, tmp_path):
    client, _, _ = store
    model = client.get_registered_model("alignflow-policy")
    assert "champion" in model.aliases
    dom = render(f"{mlflow_ui}/#/models/alignflow-policy", tmp_path / "model.png")
    assert "alignflow-policy" in dom and "champion" in dom
