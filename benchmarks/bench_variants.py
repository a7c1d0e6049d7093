"""Compare the alignment variants on the embedded default, measured side by side in one store.

Runs rlhf (ppo), rl=rloo, rl=grpo, dpo, rlaif and rlaif_dpo (run by hand: `python benchmarks/bench_variants.py
[--seeds 0,1,2] [extra overrides…]`, ~8 min per seed on 2 cores) and prints each variant's gold win rate over SFT,
gold means, KL, its own stage time, the AI judge's agreement with the gold annotator, and the reward model's
held-out accuracy (also as a share of the annotator's Bayes ceiling). Upstream stages are shared through the cache,
so the times shown are each variant's new work only.

`--seeds` repeats everything on other realisations of the embedded data (`seed=`: other pairs, prompts, tokenizer
and models) and ends with each variant's mean and range over them. One realisation moves a variant's win rate by
several hundredths, more than most tuning changes, so judge a change on the mean over seeds.

A screen of one knob: `--variants rlhf/ppo --store /tmp/screen` runs only that variant, and reruns on the same
store reuse every stage the knob does not change (SFT and the reward model when screening `rl.…`), e.g.
`… --seeds 0,1,2,3 --variants rlhf/ppo --store /tmp/screen rl.learning_rate=3e-4`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from operator import itemgetter

VARIANTS = {
    "rlhf/ppo": ["pipeline=rlhf", "rl=ppo"],
    "rlhf/rloo": ["pipeline=rlhf", "rl=rloo"],
    "rlhf/grpo": ["pipeline=rlhf", "rl=grpo"],
    "dpo": ["pipeline=dpo"],
    "rlaif/ppo": ["pipeline=rlaif"],
    "rlaif_dpo": ["pipeline=rlaif_dpo"],
}


def main(extra: list[str], seeds: list[int] | None = None, variants: list[str] | None = None,
         store: str | None = None) -> None:
    """Run the `variants` (None: all) in `store` (None: a fresh one), once per data seed in `seeds` (None: the
    config's own), and print one row per variant and seed, then (several seeds) each variant's mean and range."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ["ALIGNFLOW_ROOT"] = store or tempfile.mkdtemp(prefix="alignflow-variants-")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from flows.lifecycle import tie_children_to_process
    from flows.pipeline import alignflow

    tie_children_to_process()  # a screen stopped by SIGTERM (or killed) takes Prefect's temporary server with it

    runs: dict[int | None, list[tuple[str, dict[str, float], float]]] = {}
    for seed in seeds or [None]:
        by_seed = [] if seed is None else [f"seed={seed}"]
        for name in variants or VARIANTS:
            overrides = VARIANTS[name]
            summary = alignflow(overrides=[*overrides, *by_seed, *extra])
            m = {k: v for s in summary["stages"] for k, v in s["metrics"].items()}
            new = sum(s["wall"] for s in summary["stages"] if not s["cached"])
            runs.setdefault(seed, []).append((name, m, new))
    print(f"\nalignflow variants  extra={extra}  torch threads={torch.get_num_threads()}")
    for seed, rows in runs.items():
        print_table(rows, "variant" if seed is None else f"seed={seed}")
    if len(runs) > 1:
        print_spread(runs)


def print_table(rows: list[tuple[str, dict[str, float], float]], title: str) -> None:
    """One row per variant: win rate, gold means, KL, new stage seconds, judge agreement, RM accuracy."""
    print(f"{title:11} {'win vs SFT':>10} {'gold':>7} {'gold SFT':>8} {'KL':>6} {'new s':>6} {'judge~gold':>10} "
          f"{'RM acc':>7} {'/ceiling':>8}")
    for name, m, new in rows:
        agree = m.get("label/agreement_with_gold", float("nan"))
        acc = m.get("reward/eval_accuracy", float("nan"))
        print(f"{name:11} {m['eval/win_rate_vs_sft']:10.3f} {m['eval/gold_reward_mean']:7.3f} "
              f"{m['eval/gold_reward_mean_sft']:8.3f} {m['eval/kl_to_sft']:6.2f} {new:6.1f} {agree:10.3f} "
              f"{acc:7.3f} {_rm_share(m):8.3f}")


def print_spread(runs: dict[int | None, list[tuple[str, dict[str, float], float]]]) -> None:
    """Each variant's win rate, gold mean and reward model's share of the Bayes ceiling over the seeds: mean, then
    lowest and highest (nan where the variant has no reward model)."""
    print(f"\nover seeds {', '.join(str(seed) for seed in runs)}: mean [lowest, highest]")
    print(f"{'variant':11} {'win vs SFT':>22} {'gold':>22} {'RM acc/ceiling':>22}")
    for name in dict.fromkeys(variant for rows in runs.values() for variant, _, _ in rows):
        cells = []
        for metric in (itemgetter("eval/win_rate_vs_sft"), itemgetter("eval/gold_reward_mean"), _rm_share):
            values = [metric(m) for rows in runs.values() for variant, m, _ in rows if variant == name]
            cells.append(f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        print(f"{name:11} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22}")


def _rm_share(m: dict[str, float]) -> float:
    return m.get("reward/eval_accuracy", float("nan")) / m.get("reward/bayes_ceiling", float("nan"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=None,
                        help="data seeds to repeat every variant on, e.g. 0,1,2 (default: the config's)")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=None,
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--store", default=None,
                        help="the alignflow root to run in; reruns reuse what it has cached (default: a fresh one)")
    known, overrides = parser.parse_known_args()
    unknown = sorted(set(known.variants or ()) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    main(overrides, known.seeds, known.variants, known.store)
