"""Compare the alignment variants on the embedded default, measured side by side in one store.

Runs rlhf (ppo), rl=rloo, rl=grpo, dpo, rlaif and rlaif_dpo (run by hand: `python benchmarks/bench_variants.py
[extra overrides…]`, ~8 min on 2 cores) and prints each variant's gold win rate over SFT, gold means, KL, its own
stage time, the AI judge's agreement with the gold annotator, and the reward model's held-out accuracy (also as
a share of the annotator's Bayes ceiling). Upstream stages are shared through the cache,
so the times shown are each variant's new work only.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

VARIANTS = {
    "rlhf/ppo": ["pipeline=rlhf", "rl=ppo"],
    "rlhf/rloo": ["pipeline=rlhf", "rl=rloo"],
    "rlhf/grpo": ["pipeline=rlhf", "rl=grpo"],
    "dpo": ["pipeline=dpo"],
    "rlaif/ppo": ["pipeline=rlaif"],
    "rlaif_dpo": ["pipeline=rlaif_dpo"],
}


def main(extra: list[str]) -> None:
    """Run every variant once in a fresh store and print one row per variant."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ["ALIGNFLOW_ROOT"] = tempfile.mkdtemp(prefix="alignflow-variants-")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from flows.pipeline import alignflow

    rows = []
    for name, overrides in VARIANTS.items():
        start = time.monotonic()
        summary = alignflow(overrides=[*overrides, *extra])
        m = {k: v for s in summary["stages"] for k, v in s["metrics"].items()}
        new = sum(s["wall"] for s in summary["stages"] if not s["cached"])
        rows.append((name, m, new, time.monotonic() - start))
    print(f"\nalignflow variants  extra={extra}  torch threads={torch.get_num_threads()}")
    print(f"{'variant':11} {'win vs SFT':>10} {'gold':>7} {'gold SFT':>8} {'KL':>6} {'new s':>6} {'judge~gold':>10} "
          f"{'RM acc':>7} {'/ceiling':>8}")
    for name, m, new, _ in rows:
        agree = m.get("label/agreement_with_gold", float("nan"))
        acc = m.get("reward/eval_accuracy", float("nan"))
        ceiling = m.get("reward/bayes_ceiling", float("nan"))
        print(f"{name:11} {m['eval/win_rate_vs_sft']:10.3f} {m['eval/gold_reward_mean']:7.3f} "
              f"{m['eval/gold_reward_mean_sft']:8.3f} {m['eval/kl_to_sft']:6.2f} {new:6.1f} {agree:10.3f} "
              f"{acc:7.3f} {acc / ceiling:8.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
