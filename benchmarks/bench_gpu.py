"""The whole RLHF pipeline on CUDA with a ~100 M-parameter randomly initialised GPT-2: per-stage times, PPO tokens/s.

Run by hand on a machine with a GPU: `python benchmarks/bench_gpu.py [hydra overrides…]` (~4 minutes on an H200;
README "On a GPU" has the figures, and `benchmarks/gpu_bundle.sh` packs the dependencies for an offline GPU image).
The embedded task's model is widened to GPT-2-small's shape (12 layers × 768, ~86 M parameters with the embedded
vocabulary); the TRL stages train in bf16 (`+trainer=gpu`), our PPO and evaluation run on `device=cuda` (float32
weights, bf16 autocast, as `rl.bf16` follows `+trainer=gpu`). Prints the GPU, per-stage wall time, PPO tokens/s, peak
GPU memory and the headline metrics; then trains PPO again in float32 (`rl.bf16=false`, SFT and reward model from the
cache) and prints the tokens/s ratio of the two.
`--check` runs the same script on the CPU with a 2-layer model, to test the script itself where no GPU is lent.
`--root=DIR` uses (or fills) the store in DIR instead of a fresh one, so variants of a later stage reuse the cached
earlier ones; `--no-compare` skips the float32 PPO run.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

WIDE = ["model.init.arch.n_layer=12", "model.init.arch.n_embd=768", "model.init.arch.n_head=12"]
# conf/experiment/gpu.yaml holds the GPU settings (bf16, device, PPO batch 512 at lr 3e-6); the random model's own
# learning rates are set here.
GPU = ["experiment=gpu", *WIDE, "sft.args.learning_rate=3e-4", "reward.args.learning_rate=1e-4"]
CHECK = ["device=cpu", "model.init.arch.n_layer=2", "experiment=smoke", "rl.total_updates=4", "num_threads=2",
         "rl.bf16=true"]  # CPU autocast: the float32 comparison runs too


def run(overrides: list[str], cuda: bool) -> tuple[dict, float]:
    """One pipeline in this process (the store in ALIGNFLOW_ROOT); its flow summary and wall seconds."""
    import torch

    from flows.pipeline import alignflow

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    summary = alignflow(overrides=overrides)
    return summary, time.monotonic() - started


def report(title: str, overrides: list[str], summary: dict, wall: float, cuda: bool) -> float:
    """Print one run's stages, PPO throughput and headline metrics; returns PPO's completion tokens/s (nan: none)."""
    import torch

    from flows.config import compose_config

    rl = compose_config(overrides)["rl"]
    metrics = {k: v for s in summary["stages"] for k, v in s["metrics"].items()}
    print(f"\n== {title}: overrides={overrides}")
    print(f"model: {metrics.get('sft/n_parameters', float('nan')) / 1e6:.1f} M parameters")
    print(f"{'stage':8} {'wall s':>8}")
    for stage in summary["stages"]:
        print(f"{stage['stage']:8} {stage['wall']:8.1f}" + ("  (cached)" if stage.get("cached") else ""))
    print(f"pipeline: {wall:.1f} s in this process (flow {summary['seconds']:.1f} s)")
    ppo = next((s for s in summary["stages"] if s["stage"] == "ppo"), None)
    rate = float("nan")
    if ppo is not None:
        rate = rl["total_updates"] * rl["batch_size"] * metrics.get("ppo/mean_length", float("nan")) / ppo["wall"]
        print(f"PPO: ≈{rate:.0f} completion tokens/s, {ppo['wall'] / rl['total_updates']:.2f} s/update "
              f"(last update {metrics.get('ppo/update_seconds', float('nan')):.2f} s: generation "
              f"{metrics.get('ppo/generation_seconds', float('nan')):.2f} s, scoring "
              f"{metrics.get('ppo/scoring_seconds', float('nan')):.2f} s, optimisation "
              f"{metrics.get('ppo/optimisation_seconds', float('nan')):.2f} s), bf16={rl['bf16']}")
    if cuda:
        print(f"peak GPU memory in this run: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    for name in ("sft/train_loss", "reward/eval_accuracy", "eval/win_rate_vs_sft", "eval/kl_to_sft", "ppo/approx_kl"):
        print(f"{name:24} {metrics.get(name, float('nan')):.4f}")
    return rate


def main(argv: list[str]) -> None:
    """Run the pipeline in a fresh store and print the measurements; then, where it trained PPO in bf16, PPO again
    in float32 (SFT and reward model come from the cache) and the tokens/s ratio of the two, side by side."""
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

    device = torch.cuda.get_device_name(0) if cuda else "cpu (--check)"
    results = [("as configured", overrides, *run(overrides, cuda))]
    if compose_config(overrides)["rl"].get("bf16") and "--no-compare" not in flags:
        fp32 = [*overrides, "rl.bf16=false"]
        results.append(("PPO in float32", fp32, *run(fp32, cuda)))
    print(f"\nalignflow on {device}, torch {torch.__version__}, store={root}")
    rates = [report(title, o, summary, wall, cuda) for title, o, summary, wall in results]
    if len(rates) == 2:
        print(f"\nPPO tokens/s, bf16 / float32: {rates[0] / rates[1]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
