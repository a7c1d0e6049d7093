"""Long end-to-end run (marked slow; `make test-all`): the default `alignflow` command, as `make run` calls it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_default_command_end_to_end(tmp_path):
    env = {**os.environ, "ALIGNFLOW_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in proc.stdout + proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("alignflow").experiment_id],
                                filter_string="tags.`alignflow.pipeline` = 'rlhf'")
    m = run.data.metrics
    assert m["eval/win_rate_vs_sft"] > 0.65
    assert m["reward/eval_accuracy"] > 0.7
