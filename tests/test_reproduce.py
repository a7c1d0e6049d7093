"""`alignflow-reproduce RUN_ID`: a recorded run rebuilt in a fresh store gives the same numbers on CPU, and a
differing eval metric fails the command."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.reproduce import (
    ReproduceError,
    code_warnings,
    compare_metrics,
    fresh_root,
    main,
    overlay,
    package_warnings,
    rebuild_config,
    reproduce,
)
from tests.helpers import TINY, cli_env, pipeline_store

BIN = Path(sys.executable).parent


def test_metrics_compare_exactly_or_within_tolerance_and_timings_never_count():
    rows = {r["metric"]: r for r in compare_metrics(
        {"eval/a": 0.5, "eval/b": 1.0, "eval/nan": math.nan, "sft/seconds": 3.0, "eval/gone": 1.0},
        {"eval/a": 0.5, "eval/b": 1.0 + 1e-9, "eval/nan": math.nan, "sft/seconds": 4.0, "pipeline/x": 1.0})}
    assert not rows["eval/a"]["differs"] and not rows["eval/nan"]["differs"]
    assert rows["eval/b"]["differs"] and rows["eval/gone"]["differs"] and rows["eval/gone"]["reproduced"] is None
    assert not rows["sft/seconds"]["compared"] and not rows["pipeline/x"]["compared"]
    loose = {r["metric"]: r for r in compare_metrics({"eval/b": 1.0}, {"eval/b": 1.0 + 1e-9}, tolerance=1e-6)}
    assert not loose["eval/b"]["differs"]


def test_code_and_package_differences_are_named():
    assert code_warnings("abc", "abc") == []
    assert code_warnings("abc", "def") == ["code differs: the run was made at commit abc, this checkout is at def"]
    assert code_warnings("abc-dirty", "abc") == ["the run was made from uncommitted changes, which were not recorded"]
    assert code_warnings("abc", "abc-dirty") == ["this checkout has uncommitted changes"]
    assert package_warnings({"torch": "2.13.0", "trl": "1.16.0"}, {"torch": "2.14.0", "trl": "1.16.0"}) == [
        "package torch: 2.13.0 then, 2.14.0 now"]


def test_recorded_config_moves_to_the_new_store_and_gains_new_groups(tmp_path):
    from flows.config import compose_config

    recorded = compose_config(TINY)
    recorded.pop("registry")  # a run from before the group existed
    recorded["rl"]["kl_coef"] = 0.123  # a value today's defaults would not give
    recorded["reward"].pop("ema_decay")  # a setting added since the run
    cfg, notes = rebuild_config(recorded, TINY, tmp_path / "new")
    assert cfg["paths"]["root_dir"] == str(tmp_path / "new")
    assert cfg["tracking"]["tracking_uri"] == f"sqlite:///{tmp_path / 'new'}/mlruns/mlflow.db"
    assert cfg["rl"]["kl_coef"] == 0.123 and cfg["registry"]["model_name"] == "alignflow-policy"
    assert any("registry" in n for n in notes) and any("rl.kl_coef" in n for n in notes)
    assert cfg["reward"]["ema_decay"] == 0.98 and any("added since the run take today's defaults: reward.ema_decay"
                                                      in n for n in notes)
    assert overlay({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_a_non_empty_root_is_refused(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(ReproduceError, match="not an empty folder"):
        fresh_root(str(tmp_path))
    assert main(["some-run", "--from-root", str(tmp_path / "nothing"), "--root", str(tmp_path / "new")]) == 2


@pytest.fixture(scope="module")
def recorded(prefect_harness, tmp_path_factory):
    """One tiny RLHF run in store A."""
    with pipeline_store(tmp_path_factory.mktemp("original"), TINY) as (root, summary):
        yield root, summary["mlflow_run_id"]


def test_the_cli_reproduces_the_embedded_default_exactly(recorded, tmp_path):
    root, run_id = recorded
    env = cli_env()  # no ALIGNFLOW_ROOT: the command finds the store by --from-root and makes its own
    proc = subprocess.run([str(BIN / "alignflow-reproduce"), run_id, "--from-root", str(root), "--root",
                           str(tmp_path / "b")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("0 of ") and ", 0 of them eval/*" in summary, proc.stdout[-3000:]
    table = proc.stdout.split("not compared")[0]
    assert "eval/win_rate_vs_sft" in table and "reward/eval_accuracy" in table and "\n! " not in table
    assert (tmp_path / "b" / "mlruns" / "mlflow.db").is_file() and (tmp_path / "b" / "artifacts" / "ppo").is_dir()
    assert not (tmp_path / "mlruns").exists()  # nothing written where the command was started


def test_a_changed_eval_metric_fails_the_reproduction(recorded, tmp_path, capsys, one_thread):
    root, run_id = recorded
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    true_value = client.get_run(run_id).data.metrics["eval/win_rate_vs_sft"]
    client.log_metric(run_id, "eval/win_rate_vs_sft", true_value + 0.25, step=1)  # tamper with the record
    assert reproduce(run_id, uri, fresh_root(str(tmp_path / "c"))) == 1  # what main() returns as exit status
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if line.startswith("! ")]
    assert [line.split()[1] for line in flagged] == ["eval/win_rate_vs_sft"]
    assert "1 of them eval/*: eval/win_rate_vs_sft" in out.splitlines()[-1]
