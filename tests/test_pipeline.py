"""The whole RLHF pipeline on the embedded default (small budgets): it improves on SFT, and the cache works.

One session-wide run of `experiment=smoke` (conftest) feeds several assertions; reruns then check reuse, selective
invalidation and recovery from a deleted stage directory. CI runs this whole pipeline.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.pipeline import alignflow
from tests.conftest import SMOKE
from tests.helpers import cli_env


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
    assert [s["stage"] for s in summary["stages"]] == ["data", "sft", "reward", "ppo", "eval", "register"]
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
    assert parent.data.params["rl.kl_coef"] == "0.1"
    assert "eval/win_rate_vs_sft" in parent.data.metrics  # compare view lines pipeline runs up
    children = stage_runs(root, summary["mlflow_run_id"])
    assert set(children) == {"data", "sft", "reward", "ppo", "eval", "register"}
    assert all(c["tags"]["alignflow.cached"] == "false" for c in children.values())
    ppo_run = next(s["mlflow_run_id"] for s in summary["stages"] if s["stage"] == "ppo")
    history = client.get_metric_history(ppo_run, "ppo/mean_reward")
    assert sorted(m.step for m in history) == list(range(60))  # one point per update (experiment=smoke)
    # Each number is logged once: the stages' headline metrics on the pipeline run, their detail on the stage run.
    assert {"reward/eval_accuracy", "reward/bayes_ceiling"} <= set(parent.data.metrics)
    assert not {"reward/eval_accuracy", "eval/win_rate_vs_sft"} & {*children["reward"]["metrics"],
                                                                   *children["eval"]["metrics"]}
    assert "reward/seconds" in children["reward"]["metrics"] and "eval/eos_rate" in children["eval"]["metrics"]
    assert "ppo/mean_reward" not in parent.data.metrics  # a curve stays with its stage run
    assert len(parent.data.params) < 30  # what this run overrides plus headline knobs; all of it in config.yaml
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"config.yaml", "packages.json"} <= artifacts


def test_rerun_reuses_everything_then_rl_change_reruns_only_ppo_and_eval(first_run):
    root, first, _ = first_run
    again = alignflow(overrides=SMOKE)
    assert all(s["cached"] for s in again["stages"])  # no training at all
    assert again["seconds"] < 0.25 * first["seconds"]
    children = stage_runs(root, again["mlflow_run_id"])
    assert all(c["tags"]["alignflow.cached"] == "true" for c in children.values())
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    reused = client.get_run(again["mlflow_run_id"]).data.metrics
    assert reused["reward/eval_accuracy"] == metrics_of(first)["reward/eval_accuracy"]

    changed = alignflow(overrides=[*SMOKE, "rl.kl_coef=0.3", "rl.total_updates=2"])
    cached = {s["stage"]: s["cached"] for s in changed["stages"]}
    assert cached == {"data": True, "sft": True, "reward": True, "ppo": False, "eval": False, "register": False}


def test_deleted_stage_directory_is_rebuilt(first_run):
    root, first, _ = first_run
    reward_dir = Path(next(s["path"] for s in first["stages"] if s["stage"] == "reward"))
    shutil.rmtree(reward_dir)
    rerun = alignflow(overrides=SMOKE)
    cached = {s["stage"]: s["cached"] for s in rerun["stages"]}
    assert cached["reward"] is False and cached["sft"] is True
    assert (reward_dir / "DONE").is_file()
    assert manifest_of(rerun, "reward") == manifest_of(first, "reward")  # seeded: rebuilt byte for byte
    assert cached["ppo"] is True  # the same reward model, so the same PPO key: its outputs are reused


def manifest_of(summary: dict, stage: str) -> dict:
    return next(s["manifest"] for s in summary["stages"] if s["stage"] == stage)


def stage_dir_of(summary: dict, stage: str) -> Path:
    return Path(next(s["path"] for s in summary["stages"] if s["stage"] == stage))


def test_damaged_outputs_and_markers_are_rebuilt_not_trusted(first_run, caplog):
    root, first, _ = first_run
    weights = stage_dir_of(first, "reward") / "model" / "model.safetensors"
    weights.write_bytes(b"")  # truncated: reuse used to report "cached" and crash later in PPO
    (stage_dir_of(first, "data") / "DONE").write_text('{"truncated')  # an unreadable marker
    rerun = alignflow(overrides=SMOKE)
    cached = {s["stage"]: s["cached"] for s in rerun["stages"]}
    assert cached == {"data": False, "sft": True, "reward": False, "ppo": True, "eval": True, "register": True}
    assert "[reward] stored result is damaged" in caplog.text and "model.safetensors has 0 bytes" in caplog.text
    assert "[data] stored result is damaged" in caplog.text and "DONE is unreadable" in caplog.text
    assert manifest_of(rerun, "reward") == manifest_of(first, "reward")


def test_a_stage_rebuilt_alone_in_a_fresh_process_is_identical(first_run):
    """The reward model's scalar head used to be drawn before anything seeded the process."""
    root, first, _ = first_run
    shutil.rmtree(stage_dir_of(first, "reward"))
    env = cli_env(root, threads=torch.get_num_threads())  # the thread count of the in-process run
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *SMOKE], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rebuilt = json.loads((stage_dir_of(first, "reward") / "DONE").read_text())
    assert rebuilt["mlflow_run_id"] != next(s["mlflow_run_id"] for s in first["stages"] if s["stage"] == "reward")
    before = manifest_of(first, "reward")["files"]
    assert {f for f in before if rebuilt["manifest"]["files"].get(f) != before[f]} == set()
    volatile = ("seconds", "peak_rss_gib")  # timings and memory vary from process to process
    ours = {k: v for k, v in rebuilt["metrics"].items() if not k.endswith(volatile)}
    theirs = {k: v for k, v in metrics_of(first).items() if k.startswith("reward/") and not k.endswith(volatile)}
    assert ours == theirs


def test_an_upstream_stage_rebuilt_differently_reruns_what_depends_on_it(first_run, monkeypatch):
    """A reward model rebuilt into other weights gives PPO a new key, so PPO and everything after it run again.
    Two PPO updates are enough (the keys are checked, not the learning): one run on the original reward model,
    one on the rebuilt; were PPO's key blind to its upstream's content, the second would reuse the first's."""
    root, first, _ = first_run
    short = [*SMOKE, "rl.total_updates=2"]
    before = alignflow(overrides=short)
    assert {s["stage"]: s["cached"] for s in before["stages"]}["reward"] is True
    reward_dir = stage_dir_of(first, "reward")
    shutil.rmtree(reward_dir)
    from transformers import set_seed

    import components.reward

    monkeypatch.setattr(components.reward, "set_seed", lambda seed: set_seed(seed + 1))  # another scalar head
    try:
        rerun = alignflow(overrides=short)
        cached = {s["stage"]: s["cached"] for s in rerun["stages"]}
        assert cached == {"data": True, "sft": True, "reward": False, "ppo": False, "eval": False,
                          "register": False}
        assert manifest_of(rerun, "reward")["digest"] != manifest_of(first, "reward")["digest"]
        assert stage_dir_of(rerun, "ppo") != stage_dir_of(before, "ppo")  # a new key: trained on the new model
    finally:
        shutil.rmtree(reward_dir)  # later tests rebuild the original reward model (and reuse its PPO)


def test_a_full_disk_ends_runs_failed_with_a_one_line_cause_first(first_run, monkeypatch, caplog):
    import errno

    import components.ppo

    root, first, _ = first_run

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "artifacts" / "ppo" / "x"))

    monkeypatch.setattr(components.ppo, "train_ppo", full_disk)
    with pytest.raises(OSError):
        alignflow(overrides=[*SMOKE, "rl.kl_coef=0.25"])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors[0].startswith("[ppo] failed: OSError: [Errno 28] No space left on device")
    assert "is full: free space and rerun" in errors[0] and "\n" not in errors[0]
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("alignflow").experiment_id
    assert not client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
    failed = client.search_runs([experiment], filter_string="attributes.status = 'FAILED'",
                                order_by=["start_time DESC"], max_results=2)
    assert {r.data.tags.get("alignflow.stage", "pipeline") for r in failed} == {"ppo", "pipeline"}
    assert "No space left" in next(r for r in failed if "alignflow.stage" in r.data.tags).data.tags[
        "alignflow.end_reason"]
