"""The whole RLHF pipeline on CUDA with a ~100 M-parameter randomly initialised GPT-2: per-stage times, PPO tokens/s.

Run by hand on a machine with a GPU: `python benchmarks/bench_gpu.py [hydra overrides…]` (~4 minutes on an H200;
README "On a GPU" has the figures, and `benchmarks/gpu_bundle.sh` packs the dependencies for an offline GPU image).
The embedded task's model is widened to GPT-2-small's shape (12 layers × 768, ~86 M parameters with the embedded
vocabulary) and run with `experiment=gpu`: the TRL stages train in bf16, our PPO and evaluation run on `device=cuda`,
PPO (`rl=ppo_gpu`) with float32 weights in bf16 autocast and rollouts of 512. Prints the GPU, per-stage wall time,
PPO tokens/s, peak GPU memory and the headline metrics; then trains PPO again in float32 (`rl.bf16=false`, SFT and
reward model from the cache) and prints the ratio of their steady seconds per update (the median after the first,
from MLflow).
`--check` runs the same script on the CPU with a 2-layer model, to test the script itself where no GPU is lent.
`--root=DIR` uses (or fills) the store in DIR instead of a fresh one, so variants of a later stage reuse the cached
earlier ones; `--no-compare` skips the float32 PPO run.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import tempfile
import time

WIDE = ["model.init.arch.n_layer=12", "model.init.arch.n_embd=768", "model.init.arch.n_head=12"]
# conf/experiment/gpu.yaml holds the GPU settings (bf16, device, rl=ppo_gpu); the random model's own
# learning rates are set here.
GPU = ["experiment=gpu", *WIDE, "sft.args.learning_rate=3e-4", "reward.args.learning_rate=1e-4"]
CHECK = ["device=cpu", "model.init.arch.n_layer=2", "experiment=smoke", "rl.total_updates=4", "num_threads=2",
         "rl.bf16=true"]  # CPU autocast: the float32 comparison runs too


def run(overrides: list[str], cuda: bool) -> dict:
    """One pipeline in this process (the store in ALIGNFLOW_ROOT): its flow summary, wall seconds and peak GPU
    memory in GiB (nan on the CPU)."""
    import torch

    from flows.pipeline import alignflow

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    summary = alignflow(overrides=overrides)
    wall = time.monotonic() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"overrides": overrides, "summary": summary, "wall": wall, "peak_gib": peak}


def steady_update_seconds(tracking_uri: str, run_id: str) -> float:
    """Median PPO update time from the stage run's MLflow history, the first update (CUDA and autocast set-up)
    left out."""
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "ppo/update_seconds")
    times = [m.value for m in sorted(history, key=lambda m: m.step)]
    return statistics.median(times[1:] or times)


def report(title: str, result: dict) -> float:
    """Print one run's stages, PPO throughput and headline metrics; returns PPO's steady seconds per update (nan:
    no PPO stage trained)."""
    from flows.config import compose_config

    cfg = compose_config(result["overrides"])
    rl, summary = cfg["rl"], result["summary"]
    metrics = {k: v for s in summary["stages"] for k, v in s["metrics"].items()}
    print(f"\n== {title}: overrides={result['overrides']}")
    print(f"model: {metrics.get('sft/n_parameters', float('nan')) / 1e6:.1f} M parameters")
    print(f"{'stage':8} {'wall s':>8}")
    for stage in summary["stages"]:
        print(f"{stage['stage']:8} {stage['wall']:8.1f}" + ("  (cached)" if stage.get("cached") else ""))
    print(f"pipeline: {result['wall']:.1f} s in this process (flow {summary['seconds']:.1f} s)")
    ppo = next((s for s in summary["stages"] if s["stage"] == "ppo" and not s.get("cached")), None)
    steady = float("nan")
    if ppo is not None:
        steady = steady_update_seconds(cfg["tracking"]["tracking_uri"], ppo["mlflow_run_id"])
        tokens = rl["batch_size"] * metrics.get("ppo/mean_length", float("nan"))  # at the last update
        print(f"PPO: {ppo['wall'] / rl['total_updates']:.2f} s/update over the stage, {steady:.2f} s steady (median "
              f"after the first), ≈{tokens / steady:.0f} completion tokens/s steady; last update: generation "
              f"{metrics.get('ppo/generation_seconds', float('nan')):.2f} s, scoring "
              f"{metrics.get('ppo/scoring_seconds', float('nan')):.2f} s, optimisation "
              f"{metrics.get('ppo/optimisation_seconds', float('nan')):.2f} s; bf16={rl['bf16']}")
    if not math.isnan(result["peak_gib"]):
        print(f"peak GPU memory in this run: {result['peak_gib']:.2f} GiB")
    for name in ("sft/train_loss", "reward/eval_accuracy", "eval/win_rate_vs_sft", "eval/kl_to_sft", "ppo/approx_kl"):
        print(f"{name:24} {metrics.get(name, float('nan')):.4f}")
    return steady


def main(argv: list[str]) -> None:
    """Run the pipeline in a fresh store and print the measurements; then, where it trained PPO in bf16, PPO again
    in float32 (SFT and reward model come from the cache) and the ratio of their steady update times."""
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if flags - {"--check", "--no-compare", "--root"} or sum(a.startswith("--root") for a in argv) > 1:
        sys.exit(f"usage: bench_gpu.py [--check] [--no-compare] [--root=DIR] [overrides…]; got {sorted(flags)}")
    check = "--check" in flags
    root = next((a.split("=", 1)[1] for a in argv if a.startswith("--root=")), "")
    overrides = [*(CHECK if check else GPU), *(a for a in argv if not a.startswith("--"))]
    import torch

    cuda = not check and torch.cuda.is_available()
    if not check and not cuda:
        sys.exit("no CUDA device here: run with --check to test the script on the CPU")
    os.environ["ALIGNFLOW_ROOT"] = root = root or tempfile.mkdtemp(prefix="alignflow-gpu-")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API client logs every request
    from flows.config import compose_config
    from flows.lifecycle import tie_children_to_process

    tie_children_to_process()  # a benchmark stopped by SIGTERM (or killed) takes Prefect's temporary server with it
    device = torch.cuda.get_device_name(0) if cuda else "cpu (--check)"
    results = {"as configured": run(overrides, cuda)}
    if compose_config(overrides)["rl"].get("bf16") and "--no-compare" not in flags:
        results["PPO in float32"] = run([*overrides, "rl.bf16=false"], cuda)
    print(f"\nalignflow on {device}, torch {torch.__version__}, store={root}")
    steady = [report(title, result) for title, result in results.items()]
    if len(steady) == 2:
        print(f"\nPPO steady s/update, float32 / bf16: {steady[1] / steady[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
