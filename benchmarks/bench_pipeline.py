"""Benchmark the pipeline on the embedded default: per-stage wall time, orchestration overhead, cached rerun, memory.

Run by hand (`make bench`, or `python benchmarks/bench_pipeline.py [hydra overrides…]`). Everything is measured
in one process, side by side, in a fresh store: a first run, then the identical rerun that the cache serves (its
outputs checked by size, then once more re-hashed: `cache.verify=hashes`).
Prints ratios rather than asserting speeds; torch's thread count is fixed and reported.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import tempfile
import time


def main(overrides: list[str]) -> None:
    """Run the pipeline twice in a fresh store and print the measurements."""
    root = tempfile.mkdtemp(prefix="alignflow-bench-")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ["ALIGNFLOW_ROOT"] = root
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from flows.pipeline import alignflow

    t0 = time.monotonic()
    first = alignflow(overrides=overrides)
    first_wall = time.monotonic() - t0
    t1 = time.monotonic()
    second = alignflow(overrides=overrides)
    second_wall = time.monotonic() - t1
    hashed = alignflow(overrides=[*overrides, "cache.verify=hashes"])  # reuse with every output re-hashed
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    compute = sum(s["seconds"] for s in first["stages"])
    print(f"\nalignflow benchmark  overrides={overrides}  torch threads={torch.get_num_threads()}  store={root}")
    print(f"{'stage':8} {'wall s':>8} {'compute s':>10} {'rerun s':>8}")
    for a, b in zip(first["stages"], second["stages"], strict=True):
        print(f"{a['stage']:8} {a['wall']:8.1f} {a['seconds']:10.1f} {b['wall']:8.2f}")
    print(f"first run: flow {first['seconds']:.1f} s, process call {first_wall:.1f} s (incl. Prefect start-up)")
    print(f"pipeline flow total / sum of stage compute = {first['seconds'] / compute:.3f}"
          f"  (orchestration overhead {first['seconds'] - compute:.1f} s)")
    print(f"cached rerun / first run = {second['seconds'] / first['seconds']:.4f} (flow), "
          f"{second_wall / first_wall:.4f} (process call); stages reused: "
          f"{sum(s['cached'] for s in second['stages'])}/{len(second['stages'])}")
    print(f"cached rerun with cache.verify=hashes: flow {hashed['seconds']:.2f} s vs {second['seconds']:.2f} s "
          f"with sizes only; stages reused: {sum(s['cached'] for s in hashed['stages'])}/{len(hashed['stages'])}")
    print(f"peak resident memory: {peak_gib:.2f} GiB")
    metrics = {k: v for s in first["stages"] for k, v in s["metrics"].items()}
    for name in ("reward/eval_accuracy", "reward/bayes_ceiling", "eval/win_rate_vs_sft", "eval/gold_reward_mean",
                 "eval/gold_reward_mean_sft", "eval/kl_to_sft"):
        print(f"{name:28} {metrics.get(name, float('nan')):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
