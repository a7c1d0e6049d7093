"""Preference diversity end to end: pairs labelled by annotator profiles train a pooled and a per-annotator reward
model; MLflow gets each profile's reward-model accuracy and gold win rate, their disagreement and the worst-served
profile, for both (~1 min on one core)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import TINY, pipeline_store

PROFILES = ("concise", "critic", "enthusiast")
DIVERSE = [*TINY, "data=embedded_diverse"]


@pytest.fixture(scope="module")
def diverse_runs(prefect_harness, tmp_path_factory):
    """A pooled run, then a per-annotator run into the same store (data and SFT reused)."""
    root = tmp_path_factory.mktemp("diverse")
    summaries = {}
    for conditioning in ("pooled", "per_annotator"):
        with pipeline_store(root, [*DIVERSE, f"reward.conditioning={conditioning}"]) as (_, summary):
            summaries[conditioning] = summary
    return root, summaries


def _metrics(root, summary) -> tuple[dict[str, float], dict[str, str]]:
    """Every metric of a pipeline run and its stage runs, and the pipeline run's tags."""
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    parent = client.get_run(summary["mlflow_run_id"])
    merged = dict(parent.data.metrics)
    for stage in summary["stages"]:
        merged |= client.get_run(stage["mlflow_run_id"]).data.metrics
    return merged, parent.data.tags


@pytest.mark.parametrize("conditioning", ["pooled", "per_annotator"])
def test_per_profile_accuracy_and_win_rates_reach_mlflow(diverse_runs, conditioning, one_thread):
    root, summaries = diverse_runs
    metrics, tags = _metrics(root, summaries[conditioning])
    for name in PROFILES:
        assert 0.0 <= metrics[f"reward/eval_accuracy/{name}"] <= 1.0
        assert 0.0 <= metrics[f"eval/gold_win_rate_vs_sft/{name}"] <= 1.0
        assert 0.0 < metrics[f"data/preference_eval_bayes_ceiling/{name}"] <= 1.0
    worst = min(sorted(PROFILES), key=lambda n: metrics[f"eval/gold_win_rate_vs_sft/{n}"])  # a tie: first by name
    assert tags["alignflow.worst_served_profile"] == worst
    assert metrics["eval/worst_profile_win_rate"] == metrics[f"eval/gold_win_rate_vs_sft/{worst}"]
    assert 0.0 <= metrics["eval/profile_disagreement"] <= 1.0


def test_the_two_runs_share_data_and_sft_and_differ_from_the_reward_model_on(diverse_runs):
    _, summaries = diverse_runs
    keys = {c: {s["stage"]: s["key"] for s in summary["stages"]} for c, summary in summaries.items()}
    assert keys["pooled"]["data"] == keys["per_annotator"]["data"] and keys["pooled"]["sft"] == keys[
        "per_annotator"]["sft"]
    assert keys["pooled"]["reward"] != keys["per_annotator"]["reward"]
    cached = {s["stage"]: s["cached"] for s in summaries["per_annotator"]["stages"]}
    assert cached["data"] and cached["sft"] and not cached["reward"]


def test_summary_names_the_worst_served_profile():
    from flows.pipeline import _worst_served

    results = [{"stage": "eval", "metrics": {"eval/gold_win_rate_vs_sft/concise": 0.7,
                                             "eval/gold_win_rate_vs_sft/critic": 0.45, "eval/kl_to_sft": 1.0}}]
    assert _worst_served(results) == "\nserves profile critic worst: gold win rate vs SFT 0.450"
    assert _worst_served([{"stage": "eval", "metrics": {"eval/win_rate_vs_sft": 0.6}}]) == ""
