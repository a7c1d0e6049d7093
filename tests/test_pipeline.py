"""The whole RLHF pipeline on the embedded default (small budgets): it improves on SFT, and the cache works.

One session-wide run of `experiment=smoke` (conftest) feeds several assertions; reruns then check reuse, selective
invalidation and recovery from a deleted stage directory. CI runs this whole pipeline.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import alignflow
from tests.conftest import SMOKE


def stage_runs(store: Path, pipeline_run_id: str) -> dict[str, dict]:
    """The child runs of one pipeline run, by stage: tags and metrics."""
    client = MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")
    parent = client.get_run(pipeline_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{pipeline_run_id}'")
    return {r.data.tags["alignflow.stage"]: {"tags": r.data.tags, "metrics": r.data.metrics} for r in runs}


@pytest.fixture
def first_run(smoke_run):
    root, summary = smoke_run
    return root, summary, None


def metrics_of(summary: dict) -> dict[str, float]:
    return {k: v for stage in summary["stages"] for k, v in stage["metrics"].items()}


def test_pipeline_improves_on_sft_honestly(first_run):
    root, summary, _ = first_run
    m = metrics_of(summary)
    assert [s["stage"] for s in summary["stages"]] == ["data", "sft", "reward", "ppo", "eval"]
    assert not any(s["cached"] for s in summary["stages"])
    assert 5e5 < m["sft/n_parameters"] < 5e6  # the embedded model is built from config at ~1 M parameters
    # The reward model clearly beats chance and stays under the annotator's Bayes ceiling (+ sampling noise).
    assert 0.6 < m["reward/eval_accuracy"] <= m["reward/bayes_ceiling"] + 0.05
    # The policy beats SFT on the gold reward, with a finite, positive KL to SFT.
    assert m["eval/win_rate_vs_sft"] > 0.55
    assert m["eval/gold_reward_mean"] > m["eval/gold_reward_mean_sft"]
    assert math.isfinite(m["eval/kl_to_sft"]) and m["eval/kl_to_sft"] > 0
    for name in ("ppo/mean_reward", "ppo/kl", "ppo/entropy", "eval/proxy_reward_mean"):
        assert math.isfinite(m[name])


def test_mlflow_run_tree(first_run):
    root, summary, _ = first_run
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["alignflow.pipeline"] == "rlhf"
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["rl.kl_coef"] == "0.2"
    assert "eval/win_rate_vs_sft" in parent.data.metrics  # compare view lines pipeline runs up
    children = stage_runs(root, summary["mlflow_run_id"])
    assert set(children) == {"data", "sft", "reward", "ppo", "eval"}
    assert all(c["tags"]["alignflow.cached"] == "false" for c in children.values())
    ppo_run = next(s["mlflow_run_id"] for s in summary["stages"] if s["stage"] == "ppo")
    history = client.get_metric_history(ppo_run, "ppo/mean_reward")
    assert sorted(m.step for m in history) == list(range(15))  # one point per update
    assert {"reward/eval_accuracy", "reward/bayes_ceiling"} <= set(children["reward"]["metrics"])
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"config.yaml", "packages.json"} <= artifacts


def test_rerun_reuses_everything_then_rl_change_reruns_only_ppo_and_eval(first_run):
    root, first, _ = first_run
    again = alignflow(overrides=SMOKE)
    assert all(s["cached"] for s in again["stages"])  # no training at all
    assert again["seconds"] < 0.25 * first["seconds"]
    children = stage_runs(root, again["mlflow_run_id"])
    assert all(c["tags"]["alignflow.cached"] == "true" for c in children.values())
    assert children["reward"]["metrics"]["reward/eval_accuracy"] == metrics_of(first)["reward/eval_accuracy"]

    changed = alignflow(overrides=[*SMOKE, "rl.kl_coef=0.3", "rl.total_updates=2"])
    cached = {s["stage"]: s["cached"] for s in changed["stages"]}
    assert cached == {"data": True, "sft": True, "reward": True, "ppo": False, "eval": False}


def test_deleted_stage_directory_is_rebuilt(first_run):
    root, first, _ = first_run
    reward_dir = Path(next(s["path"] for s in first["stages"] if s["stage"] == "reward"))
    shutil.rmtree(reward_dir)
    rerun = alignflow(overrides=SMOKE)
    cached = {s["stage"]: s["cached"] for s in rerun["stages"]}
    assert cached["reward"] is False and cached["sft"] is True
    assert (reward_dir / "DONE").is_file()
    assert cached["ppo"] is True  # same key: its own outputs are intact
