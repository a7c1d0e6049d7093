"""Sweeps that close with a verdict, one comparison view, run names and params that say what differs.

Most tests build runs by hand in a temporary MLflow store (no training); one runs a real `alignflow -m` sweep of
three RL settings on tiny budgets through the CLI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.analysis import gao_rl
from flows.compare import compare, main, seed_table, seed_verdict, sweep_jobs
from flows.naming import run_name, run_params, short_keys
from flows.stages import detail_metrics, headline_metrics
from flows.sweep import SWEEP_ENV, SweepCallback, swept
from flows.tracking import init_tracking
from tests.helpers import TINY, cli_env

REPO = Path(__file__).resolve().parent.parent
# Hand-made sweep: gold gain follows Gao et al.'s R(d) = d(1 − 0.5 ln d), peaking at d = e (KL ≈ 7.39), while the
# proxy keeps rising; the gold falls after d = 3 (KL 9, kl_coef 0.05), which therefore wins.
COEFS = (0.4, 0.2, 0.1, 0.05, 0.02, 0.01)
DISTANCES = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)


def _tracking(root: Path) -> dict:
    return {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "artifact_root": str(root / "mlruns" / "artifacts"),
            "experiment_name": "alignflow"}


def _pipeline_run(client: MlflowClient, exp: str, sweep: str, coef: float, d: float, tmp: Path) -> str:
    gain = float(gao_rl(d, 1.0, 0.5))
    run = client.create_run(exp, run_name=f"rlhf kl_coef={coef}",
                            tags={"mlflow.parentRunId": sweep, "alignflow.pipeline": "rlhf"}).info.run_id
    config = {"pipeline": {"name": "rlhf", "optimizer": "rl"}, "rl": {"algorithm": "ppo", "kl_coef": coef}, "seed": 0}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    client.log_artifact(run, str(tmp / "config.yaml"))
    for name, value in {"eval/win_rate_vs_sft": 0.5 + 0.1 * gain, "eval/gold_reward_mean": 0.1 + gain,
                        "eval/gold_reward_mean_sft": 0.1, "eval/kl_to_sft": d * d, "reward/eval_accuracy": 0.7,
                        "data/n_sft": 300.0, "eval/win_rate_vs_sft_stderr": 0.01}.items():
        client.log_metric(run, name, value)
    tags = {"mlflow.parentRunId": run, "alignflow.stage": "eval"}
    eval_run = client.create_run(exp, run_name="eval", tags=tags).info.run_id
    client.log_metric(eval_run, "eval/proxy_reward_mean", 0.2 + 0.3 * d)
    client.log_metric(eval_run, "eval/proxy_reward_mean_sft", 0.2)
    ppo = client.create_run(exp, run_name="ppo", tags={**tags, "alignflow.stage": "ppo"}).info.run_id
    for step in range(5):
        client.log_metric(ppo, "ppo/mean_reward", 0.1 * step * d, step=step)
        client.log_metric(ppo, "ppo/kl", 0.2 * step * d, step=step)
    return run


@pytest.fixture
def fake_sweep(tmp_path):
    """A store with one sweep run over six PPO KL coefficients (no training)."""
    exp = init_tracking(_tracking(tmp_path))
    client = MlflowClient()
    sweep = client.create_run(exp, run_name="sweep rl.kl_coef=…", tags={"alignflow.sweep": "multirun/x"}).info.run_id
    runs = []
    for coef, d in zip(COEFS, DISTANCES, strict=True):
        runs.append(_pipeline_run(client, exp, sweep, coef, d, tmp_path))
        time.sleep(0.01)  # distinct start times: the first run is the baseline
    return tmp_path, client, sweep, runs


def test_compare_table_diff_verdict_plots_logged_on_the_sweep_run(fake_sweep):
    root, client, sweep, runs = fake_sweep
    jobs = sweep_jobs(client, client.get_run(sweep))
    assert [j.info.run_id for j in jobs] == runs
    cmp = compare(client, jobs, out_dir=root / "out", log_to=sweep)

    assert list(cmp.table.index) == [f"rlhf kl_coef={c}" for c in COEFS]
    assert list(cmp.table.columns[:5]) == ["run_id", "status", "variant", "eval/win_rate_vs_sft",
                                           "eval/win_rate_vs_sft_stderr"]
    assert set(cmp.table["variant"]) == {"rlhf/ppo"}
    assert "eval/proxy_reward_mean" in cmp.table  # merged in from the eval stage run
    assert "data/n_sft" not in cmp.table  # the same for every run: no column
    assert list(cmp.diff.columns) == ["rl.kl_coef"] and cmp.diff["rl.kl_coef"].tolist() == [str(c) for c in COEFS]
    assert cmp.best == "rlhf kl_coef=0.05" and cmp.baseline == "rlhf kl_coef=0.4"
    assert "`rlhf kl_coef=0.05` wins on eval/win_rate_vs_sft" in cmp.verdict
    assert "over the runner-up `rlhf kl_coef=0.1`" in cmp.verdict and "baseline `rlhf kl_coef=0.4`" in cmp.verdict
    assert "at eval/kl_to_sft=9" in cmp.verdict
    assert cmp.seeds.empty and "Over seeds" not in cmp.verdict  # one seed per variant: nothing to pool
    # win rates 0.5 + 0.1 * gain, each ± 0.01: 0.0045 over the runner-up is noise, 0.068 over the baseline is not
    assert "(0.6307; 0.32 standard errors, within evaluation noise)" in cmp.verdict
    assert "(0.5673; 4.8 standard errors)" in cmp.verdict
    assert "do not tell `rlhf kl_coef=0.05` from `rlhf kl_coef=0.1` apart" in cmp.verdict
    fit = cmp.overoptimization.fit
    assert (fit.alpha, fit.beta) == pytest.approx((1.0, 0.5), abs=1e-6)
    assert fit.peak_kl == pytest.approx(math.e**2) and cmp.overoptimization.onset_kl == pytest.approx(9.0)
    assert "beyond KL≈9 the proxy keeps rising while the gold falls" in cmp.verdict

    files = {p.name for p in (root / "out").iterdir()}
    assert {"compare.csv", "config_diff.csv", "compare.html", "verdict.txt", "frontier.png",
            "overoptimization.png", "training_curves.png"} <= files
    logged = {a.path for a in client.list_artifacts(sweep, "compare")}
    assert {"compare/compare.csv", "compare/compare.html", "compare/frontier.png",
            "compare/overoptimization.png", "compare/training_curves.png"} <= logged
    run = client.get_run(sweep)
    assert run.data.tags["alignflow.verdict"] == cmp.verdict
    assert run.data.tags["alignflow.best_run"] == runs[3]
    assert run.data.metrics["best/eval/win_rate_vs_sft"] == pytest.approx(0.5 + 0.1 * float(gao_rl(3.0, 1.0, 0.5)))
    assert "eval/win_rate_vs_sft" not in run.data.metrics  # prefixed: the winner is not charted twice
    assert run.data.metrics["overopt/beta"] == pytest.approx(0.5, abs=1e-6)
    assert "rlhf kl_coef=0.05" in cmp.report() and "config diff against the baseline" in cmp.report()


def test_compare_groups_seeds_into_variants_with_their_spread(tmp_path):
    exp = init_tracking(_tracking(tmp_path))
    client = MlflowClient()
    sweep = client.create_run(exp, run_name="sweep", tags={"alignflow.sweep": "multirun/y"}).info.run_id
    wins = {0.1: (0.80, 0.82, 0.84), 0.2: (0.78, 0.79, 0.80)}  # means 0.82 and 0.79, std 0.02 and 0.01
    for coef, values in wins.items():
        for seed, value in enumerate(values):
            run = client.create_run(exp, run_name=f"rlhf kl_coef={coef} seed={seed}",
                                    tags={"mlflow.parentRunId": sweep, "alignflow.pipeline": "rlhf"}).info.run_id
            config = {"pipeline": {"name": "rlhf", "optimizer": "rl"}, "seed": seed,
                      "rl": {"algorithm": "ppo", "kl_coef": coef, "seed": seed}, "sft": {"args": {"data_seed": seed}}}
            (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
            client.log_artifact(run, str(tmp_path / "config.yaml"))
            client.log_metric(run, "eval/win_rate_vs_sft", value)
            client.log_metric(run, "eval/kl_to_sft", 4.0 + seed)
            time.sleep(0.01)
    cmp = compare(client, sweep_jobs(client, client.get_run(sweep)), out_dir=tmp_path / "out")

    seeds = cmp.seeds
    assert list(seeds.index) == ["rlhf kl_coef=0.1", "rlhf kl_coef=0.2"] and seeds["seeds"].tolist() == [3, 3]
    assert seeds["mean"].tolist() == pytest.approx([0.82, 0.79])
    assert seeds["stderr"].tolist() == pytest.approx([0.02 / 3**0.5, 0.01 / 3**0.5])
    assert seeds["eval/kl_to_sft"].tolist() == pytest.approx([5.0, 5.0])
    # 0.03 / sqrt(0.01155² + 0.00577²) = 2.3 standard errors: apart
    assert ("Over seeds: `rlhf kl_coef=0.1` leads with 0.82 ± 0.012 over 3 seeds, +0.03 over `rlhf kl_coef=0.2` "
            "(0.79 ± 0.0058 over 3 seeds); 2.3 standard errors over seeds.") in cmp.verdict
    assert (tmp_path / "out" / "seeds.csv").is_file() and "over seeds" in cmp.report()

    client.log_metric(client.search_runs([exp], filter_string="attributes.run_name = 'rlhf kl_coef=0.2 seed=2'")[0]
                      .info.run_id, "eval/win_rate_vs_sft", 0.86)  # the last value counts: 0.2 now 0.81 ± 0.025
    cmp = compare(client, sweep_jobs(client, client.get_run(sweep)))
    assert "within the seeds' noise, run more seeds to tell them apart" in cmp.verdict
    labels = ["a seed=0", "a seed=1", "b"]
    configs = [{"config": {"seed": 0, "x": 1}}, {"config": {"seed": 1, "x": 1}}, {"config": {"x": 2}}]
    lone = seed_table(configs, labels, pd.DataFrame({"m": [0.5, 0.7, 0.9]}, index=labels), "m")
    assert lone["seeds"].tolist() == [2, 1] and seed_verdict(lone, "max") == (
        "Over seeds: `b` leads with 0.9 over 1 seed, +0.3 over `a` (0.6 ± 0.1 over 2 seeds); a variant with one "
        "seed has no spread to judge by.")


def test_compare_cli_latest_sweep_run_ids_and_errors(fake_sweep, monkeypatch, capsys):
    root, client, sweep, runs = fake_sweep
    monkeypatch.setenv("ALIGNFLOW_ROOT", str(root))
    assert main(["--no-log"]) == 0
    out = capsys.readouterr().out
    assert "Verdict: `rlhf kl_coef=0.05` wins" in out and (root / "compare" / sweep / "compare.csv").is_file()
    assert main([runs[0], runs[1], "--baseline", runs[1][:8], "--out", str(root / "two"), "--metric",
                 "eval/kl_to_sft", "--mode", "min"]) == 0
    out = capsys.readouterr().out
    assert "Verdict: `rlhf kl_coef=0.4` wins on eval/kl_to_sft (lower is better)" in out
    assert "standard errors" not in out  # no standard error logged for the KL: no claim about noise
    assert "baseline `rlhf kl_coef=0.2`" in out
    assert main(["no-such-thing"]) == 2
    assert "neither an experiment nor a run id" in capsys.readouterr().err


def test_compare_without_gold_or_rl_draws_what_it_can(tmp_path):
    exp = init_tracking(_tracking(tmp_path))
    client = MlflowClient()
    runs = []
    for beta in (0.1, 0.3):
        run = client.create_run(exp, run_name=f"dpo beta={beta}", tags={"alignflow.pipeline": "dpo"})
        client.log_param(run.info.run_id, "pipeline.optimizer", "dpo")
        client.log_metric(run.info.run_id, "eval/win_rate_vs_sft", 0.6 + beta)
        client.log_metric(run.info.run_id, "eval/kl_to_sft", 10 * beta)
        runs.append(client.get_run(run.info.run_id))
    cmp = compare(client, runs)
    assert set(cmp.figures) == {"frontier"} and cmp.overoptimization is None  # no proxy/gold: no over-opt view
    assert cmp.best == "dpo beta=0.3" and "pipeline.optimizer" not in cmp.diff  # params stand in for config


def test_run_names_say_what_differs_and_params_stay_few():
    tiny = ["experiment=smoke", "sft.args.num_train_epochs=1", "reward.args.num_train_epochs=1"]
    assert run_name("rlhf", [*tiny, "rl.kl_coef=0.02"], ["rl.kl_coef"]) == "rlhf kl_coef=0.02"
    assert run_name("rlhf", [*tiny, "rl.kl_coef=0.2"], ["rl.kl_coef"]) == "rlhf kl_coef=0.2"
    assert run_name("dpo", ["pipeline=dpo", "seed=1"], ["pipeline", "seed"]) == "dpo seed=1"
    # alone: every override, keys as short as they stay unique, nothing cut inside a value
    assert run_name("rlhf", [*tiny, "+trainer=gpu"]) == ("rlhf experiment=smoke sft.args.num_train_epochs=1 "
                                                          "reward.args.num_train_epochs=1 trainer=gpu")
    long = run_name("rlhf", [f"rl.key_{i:03d}=value_{i:03d}" for i in range(40)])
    assert len(long) <= 250 and long.endswith(" more") and " key_0" in long and "=value_" in long.split()[-3]
    assert short_keys(["a.x", "x", "b.c", "d.c"]) == {"a.x": "a.x", "x": "x", "b.c": "b.c", "d.c": "d.c"}
    from flows.config import compose_config

    overrides = ["pipeline=dpo", "dpo.args.beta=0.3", "experiment=smoke"]
    params = run_params(compose_config(overrides), overrides)
    assert params["pipeline"] == "dpo" and params["dpo.args.beta"] == "0.3" and params["experiment"] == "smoke"
    assert "rl.kl_coef" not in params and len(params) < 15  # was ~270 flattened keys


def test_swept_keys_come_from_sweeper_params_and_the_command_line():
    found = swept(["rl.kl_coef=0.05,0.2", "experiment=smoke", "seed=range(0,2)"], {"pipeline": "rlhf,dpo"})
    assert found == {"pipeline": "rlhf,dpo", "rl.kl_coef": "0.05,0.2", "seed": "range(0,2)"}


def test_each_number_is_logged_on_one_run():
    result = {"stage": "ppo", "metrics": {"ppo/mean_reward": 1.0, "ppo/kl": 2.0, "ppo/entropy": 3.0},
              "curves": ["ppo/mean_reward", "ppo/entropy"]}
    assert headline_metrics(result) == {"ppo/kl": 2.0}  # a headline without a curve goes to the pipeline run
    assert detail_metrics(result) == {"ppo/mean_reward": 1.0, "ppo/entropy": 3.0}  # curves stay with the stage
    old = {"stage": "eval", "metrics": {"eval/win_rate_vs_sft": 0.6, "eval/eos_rate": 1.0}}  # a marker before
    assert headline_metrics(old) == {"eval/win_rate_vs_sft": 0.6} and detail_metrics(old) == {"eval/eos_rate": 1.0}


def test_a_sweep_that_stops_early_ends_failed_with_the_reason(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import JobReturn, JobStatus

    from flows.config import CONF_DIR

    monkeypatch.setenv("ALIGNFLOW_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=["hparams_search=kl_sweep"], return_hydra_config=True)
    config.hydra.sweep.dir = str(tmp_path / "multirun")
    callback = SweepCallback(metric="eval/gold_reward_mean")
    callback.on_multirun_start(config)
    sweep = os.environ[SWEEP_ENV]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = client.get_run(sweep)
    assert run.info.status == "RUNNING" and run.info.run_name == "sweep kl_sweep: rl.kl_coef=0.05,0.1,0.2,0.4"
    assert json.loads(run.data.tags["alignflow.sweep.keys"]) == ["rl.kl_coef"]
    assert run.data.tags["alignflow.sweep.metric"] == "eval/gold_reward_mean"
    failed = JobReturn(overrides=["rl.kl_coef=0.1"], status=JobStatus.FAILED)
    failed.return_value = RuntimeError("boom")
    callback.on_job_end(config, failed)
    callback.close("stopped")
    run = client.get_run(sweep)
    assert run.info.status == "FAILED" and SWEEP_ENV not in os.environ
    assert "stopped" in run.data.tags["alignflow.end_reason"] and "boom" in run.data.tags["alignflow.end_reason"]
    callback.close()  # the atexit hook after on_multirun_end: nothing happens twice
    assert client.get_run(sweep).info.status == "FAILED"


def test_help_lists_pipelines_groups_and_examples(tmp_path):
    env = {**os.environ, "ALIGNFLOW_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in ("== Pipelines", "rlaif_dpo", "== Config groups", "hparams_search: ", "== Examples",
                 "alignflow -m hparams_search=overoptimization", "alignflow-compare"):
        assert text in proc.stdout, text
    assert "== Config ==" not in proc.stdout  # no dump of the whole composed config


def test_real_sweep_closes_with_a_verdict(tmp_path):
    """`alignflow -m` over three KL coefficients on tiny budgets: one sweep run, FINISHED, with the verdict, the
    table and the plots on it; SFT trained once; every pipeline run named by its KL coefficient."""
    env = cli_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "-m", "rl.kl_coef=0.05,0.2,0.4", *TINY],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Verdict: `rlhf kl_coef=" in proc.stdout and "sweep run" in proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("alignflow").experiment_id
    (sweep,) = client.search_runs([exp], filter_string="tags.`alignflow.sweep` LIKE '%'")
    assert sweep.info.status == "FINISHED"
    assert "wins on eval/win_rate_vs_sft" in sweep.data.tags["alignflow.verdict"]
    assert json.loads(sweep.data.tags["alignflow.overrides"])[0] == "rl.kl_coef=0.05,0.2,0.4"
    logged = {a.path for a in client.list_artifacts(sweep.info.run_id, "compare")}
    assert {"compare/compare.csv", "compare/compare.html", "compare/verdict.txt"} <= logged
    assert {"compare/frontier.png", "compare/overoptimization.png"} <= {p for p in logged if p.endswith(".png")}
    assert "best/eval/win_rate_vs_sft" in sweep.data.metrics

    jobs = sweep_jobs(client, sweep)
    assert sorted(j.info.run_name for j in jobs) == ["rlhf kl_coef=0.05", "rlhf kl_coef=0.2", "rlhf kl_coef=0.4"]
    assert len(list((tmp_path / "artifacts" / "sft").glob("*/DONE"))) == 1  # trained once, reused twice
    job = jobs[0]
    assert job.data.params["rl.kl_coef"] == "0.05" and len(job.data.params) < 30
    assert "eval/win_rate_vs_sft" in job.data.metrics and "reward/eval_accuracy" in job.data.metrics
    stages = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{job.info.run_id}'")
    eval_run = next(s for s in stages if s.data.tags["alignflow.stage"] == "eval")
    assert "eval/win_rate_vs_sft" not in eval_run.data.metrics  # each number once: no variant charted twice
    assert "eval/proxy_reward_mean" in eval_run.data.metrics
    csv = next((tmp_path / "multirun").glob("*/*/compare/compare.csv"))
    assert len(csv.read_text().strip().splitlines()) == 4  # header + 3 runs
