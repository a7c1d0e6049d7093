"""Alignment variants on one footing: DPO, RLAIF, RLAIF+DPO, CAI and RLOO/GRPO share the cached upstream stages.

These run against the session's smoke store (conftest.smoke_run), so the SFT model trained there is reused by
every other pipeline, which the MLflow cache tags show. Gold win rates come from the embedded task's known gold
reward, measured on held-out prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import alignflow
from tests.conftest import SMOKE
from tests.test_pipeline import metrics_of, stage_runs

EVAL_KEYS = {"eval/gold_reward_mean", "eval/gold_reward_mean_sft", "eval/win_rate_vs_sft", "eval/kl_to_sft"}


@pytest.fixture(scope="module")
def variants(smoke_run):
    root, rlhf = smoke_run
    runs = {"rlhf": rlhf}
    for name in ("dpo", "rlaif", "rlaif_dpo"):
        runs[name] = alignflow(overrides=[*SMOKE, f"pipeline={name}"])
    return root, runs


def test_sft_trains_once_and_every_variant_reports_the_same_eval_metrics(variants):
    root, runs = variants
    for name, summary in runs.items():
        children = stage_runs(root, summary["mlflow_run_id"])
        assert EVAL_KEYS <= set(children["eval"]["metrics"]), name
        if name != "rlhf":
            assert children["sft"]["tags"]["alignflow.cached"] == "true", name
            assert children["data"]["tags"]["alignflow.cached"] == "true", name
    stages = {n: [s["stage"] for s in r["stages"]] for n, r in runs.items()}
    assert stages["dpo"] == ["data", "sft", "dpo", "eval"]
    assert stages["rlaif"] == ["data", "sft", "label", "reward", "ppo", "eval"]
    assert stages["rlaif_dpo"] == ["data", "sft", "label", "dpo", "eval"]
    label = {n: next(s for s in runs[n]["stages"] if s["stage"] == "label") for n in ("rlaif", "rlaif_dpo")}
    assert label["rlaif_dpo"]["cached"] and label["rlaif_dpo"]["key"] == label["rlaif"]["key"]  # judged once


def test_dpo_and_rlaif_beat_sft_on_gold(variants):
    _, runs = variants
    for name in ("dpo", "rlaif", "rlaif_dpo"):
        m = metrics_of(runs[name])
        assert m["eval/win_rate_vs_sft"] > 0.55, (name, m["eval/win_rate_vs_sft"])
        assert m["eval/gold_reward_mean"] > m["eval/gold_reward_mean_sft"], name
    dpo = metrics_of(runs["dpo"])
    assert {"dpo/rewards_margin", "dpo/accuracy"} <= set(dpo) and dpo["dpo/rewards_margin"] > 0


def test_ai_judge_agreement_with_gold_is_reported(variants):
    _, runs = variants
    m = metrics_of(runs["rlaif"])
    assert 0.6 < m["label/agreement_with_gold"] <= 1.0
    assert 0.0 <= m["label/tie_rate"] < 1.0
    assert "eval/proxy_reward_mean" not in metrics_of(runs["dpo"])  # no reward model in DPO: nothing invented


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_trl_rl_algorithms_run_and_are_evaluated_like_ppo(variants, algorithm):
    _, runs = variants
    summary = alignflow(overrides=[*SMOKE, f"rl={algorithm}", "rl.args.max_steps=3"])
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["data", "sft", "reward", algorithm, "eval"]
    assert stages["reward"]["cached"] and stages["reward"]["key"] == next(
        s["key"] for s in runs["rlhf"]["stages"] if s["stage"] == "reward")  # one reward model for every rl=
    assert f"{algorithm}/mean_reward" in stages[algorithm]["metrics"]
    assert EVAL_KEYS <= set(stages["eval"]["metrics"])


def test_cai_pipeline_runs_its_revision_phase(variants):
    summary = alignflow(overrides=[*SMOKE, "pipeline=cai", "revision.n_prompts=32", "rl.total_updates=2"])
    stages = [s["stage"] for s in summary["stages"]]
    assert stages == ["data", "sft", "revise", "sft_cai", "label", "reward", "ppo", "eval"]
    m = metrics_of(summary)
    assert m["revise/n_revised"] == 32  # plumbing only: the tiny model is no instruction follower


def test_cli_sweep_groups_jobs_under_one_parent(variants):
    root, runs = variants
    env = {**os.environ, "ALIGNFLOW_ROOT": str(root)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "-m", "pipeline=rlhf,dpo", *SMOKE],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("alignflow").experiment_id
    sweeps = client.search_runs([exp], filter_string="tags.`alignflow.sweep` LIKE '%'")
    assert len(sweeps) == 1
    jobs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{sweeps[0].info.run_id}'")
    assert sorted(r.data.tags["alignflow.pipeline"] for r in jobs) == ["dpo", "rlhf"]
    assert all(json.loads(r.data.tags["alignflow.overrides"]) for r in jobs)
    for job in jobs:  # everything was already computed by the tests above: the sweep trains nothing
        children = stage_runs(root, job.info.run_id)
        assert all(c["tags"]["alignflow.cached"] == "true" for c in children.values())
