"""Annotation cost, measured: reward-model accuracy against labels spent, for each way of choosing what to label.

Run by hand: `python benchmarks/bench_feedback.py [--quick] [--seeds 0 1] [--tracking-uri URI]`. Everything is built
from scratch in a fresh folder (`--workdir`, default a temporary one), in one process, side by side:

1. the embedded task (components/review_task.py), its ~1 M-parameter base model and an SFT model (TRL, as the
   pipeline's sft stage with conf/sft/default.yaml's settings);
2. a candidate pool: `--pool` training prompts with `--k` SFT samples each (conf/rl's 32 tokens, temperature 1;
   prompts whose samples are empty or repeat are skipped, as an annotator would not rank them), and a held-out
   set: `--k` SFT samples for each of `--eval-prompts` evaluation prompts (half on held-out topics), every pair
   ordered by the gold reward (gold ties dropped). This on-policy set is what a reward model meets in RL; the data
   stage's `preference_eval` pairs, oriented by gold, are scored too (`acc_pref_eval`, logged only);
3. per repeat seed, pool-based active learning for every strategy of components/selection.py: the same random
   seed batch, then rounds: train a reward model from the SFT checkpoint on the pairs so far (TRL RewardTrainer via
   components.reward, conf/reward/default.yaml's settings, the repeat's seed), measure its held-out accuracy, score
   the pool's unlabelled prompts and choose the next batch with `select_prompts`:
   - `random`: uniformly;
   - `uncertainty`: the smallest margin between two of a prompt's responses under the current reward model (with
     `--uncertainty-ensemble`, under the mean of the same ensemble `disagreement` uses; with
     `--uncertainty-score information`, the most expected Bradley–Terry information over all of its response
     pairs, `most_informative`, instead of the smallest margin);
   - `disagreement`: the most split response order across an ensemble of `--ensemble` reward models: the current
     one plus members trained on bootstrap resamples of the labelled prompts with other seeds (the AI judges
     would need a sentence encoder from the hub; an ensemble needs nothing). Its curve is the accuracy of the
     current (non-bootstrap) model, like the others, so an ensemble's own gain is not counted as the selection's.
   A chosen prompt is ranked by a simulated annotator (`AnnotatorProfile`, Plackett–Luce noise at
   `--annotator-temperature`, utility = gold); each prompt's ranking is drawn once per repeat from its own stream,
   so every strategy that picks a prompt gets the same labels for it; rankings become all K(K−1)/2 pairs.

Prints the accuracy per strategy and labels spent (mean over repeats, and each repeat), the pairs behind them, and
for each active strategy the labels it needed to reach random selection's final accuracy as a share of random's
(linear interpolation between rounds; goal <= 0.6). Logs the curves to MLflow (metrics with step = labels spent,
and a plot artifact) in a sqlite store in the work folder unless `--tracking-uri` names another (as
flows/tracking.py sets the pipeline's). The last line is `labels_share <strategy>=<share> …` (`inf`: never reached).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from itertools import combinations
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.selection import (  # noqa: E402
    STRATEGIES,
    bootstrap,
    label_schedule,
    label_share,
    mean_curve,
    most_informative,
    select_from_pool,
)

Pool = list[dict[str, Any]]  # {"prompt", "responses"}
TRAINER = {"save_strategy": "no", "eval_strategy": "no", "report_to": "none", "disable_tqdm": True, "bf16": False,
           "activation_checkpointing": False, "dataloader_num_workers": 0, "dataloader_pin_memory": False}


# ------------------------------------------------------------------------------------------------------- set-up
def build_task(args: argparse.Namespace, work: Path) -> tuple[str, Pool, Any, Any]:
    """The SFT checkpoint, the candidate pool and the two held-out pair sets (on-policy, preference_eval)."""
    import yaml
    from datasets import Dataset
    from trl import SFTConfig

    from components.generation import SamplingSettings, sample
    from components.modeling import build_base_checkpoint, load_causal_lm, load_tokenizer
    from components.review_task import build_embedded_splits, corpus
    from components.sft import train_sft

    splits = build_embedded_splits(n_sft=args.n_sft, n_preference=1, n_eval_preference=args.eval_preference,
                                   n_prompts=int(args.pool * 1.25) + 10, n_eval_prompts=args.eval_prompts,
                                   annotator_temperature=args.annotator_temperature, seed=0)  # fmt: skip
    init = yaml.safe_load((REPO / "conf/model/tiny.yaml").read_text())["init"]
    base = build_base_checkpoint(corpus(splits), init["arch"], init["vocab_size"], 0, work / "base")
    sft_cfg = yaml.safe_load((REPO / "conf/sft/default.yaml").read_text())["args"]
    sft_cfg = {k: v for k, v in sft_cfg.items() if k != "_target_"} | {"num_train_epochs": args.sft_epochs}
    sft_args = SFTConfig(output_dir=str(work / "scratch"), seed=0, **TRAINER, **sft_cfg)
    sft_path = str(work / "sft")
    train_sft(base, Dataset.from_list(splits["sft"]), sft_args, sft_path)

    tokenizer, model = load_tokenizer(sft_path), load_causal_lm(sft_path).eval()
    settings = SamplingSettings(max_new_tokens=32, temperature=1.0, batch_size=64, seed=0)

    def draw(prompts: list[str], first_seed: int) -> list[list[str]]:
        samples = [sample(model, tokenizer, prompts, settings, seed=first_seed + k).texts for k in range(args.k)]
        return [[s[i] for s in samples] for i in range(len(prompts))]

    prompts = [row["prompt"] for row in splits["prompts"]]
    pool = [{"prompt": p, "responses": r} for p, r in zip(prompts, draw(prompts, 0), strict=True)
            if all(t.strip() for t in r) and len(set(r)) == len(r)][: args.pool]  # fmt: skip
    if len(pool) < args.pool:
        print(f"note: only {len(pool)} pool prompts have {args.k} distinct non-empty samples")
    eval_prompts = [row["prompt"] for row in splits["eval_prompts"]]
    held_out = Dataset.from_list(gold_pairs(eval_prompts, draw(eval_prompts, 1000)))
    pref_eval = Dataset.from_list([oriented(r) for r in splits["preference_eval"]
                                   if r["gold_chosen"] != r["gold_rejected"]])  # fmt: skip
    return sft_path, pool, held_out, pref_eval


def gold_pairs(prompts: list[str], responses: list[list[str]]) -> list[dict[str, str]]:
    """Every pair of a prompt's responses, the one with the higher gold reward as `chosen` (gold ties dropped)."""
    from components.review_task import gold_reward

    pairs = []
    for prompt, texts in zip(prompts, responses, strict=True):
        gold = [gold_reward(t) for t in texts]
        for i, j in combinations(range(len(texts)), 2):
            if gold[i] != gold[j]:
                better, worse = (i, j) if gold[i] > gold[j] else (j, i)
                pairs.append({"prompt": prompt, "chosen": texts[better], "rejected": texts[worse]})
    return pairs


def oriented(row: dict[str, Any]) -> dict[str, str]:
    """A preference_eval row with the higher-gold side as `chosen` (the annotator's noise removed)."""
    flip = row["gold_chosen"] < row["gold_rejected"]
    return {"prompt": row["prompt"], "chosen": row["rejected"] if flip else row["chosen"],
            "rejected": row["chosen"] if flip else row["rejected"]}  # fmt: skip


def label_quality(pairs: list[dict[str, str]]) -> dict[str, float]:
    """What the labels bought are worth: the share of pairs whose chosen side has the higher gold (ties half;
    the annotator's noise shows as < 1) and the mean gold gap between the two sides (small: hard, noisy pairs)."""
    from components.review_task import gold_reward, label_accuracy

    chosen = [gold_reward(p["chosen"]) for p in pairs]
    rejected = [gold_reward(p["rejected"]) for p in pairs]
    gap = statistics.fmean(abs(c - r) for c, r in zip(chosen, rejected, strict=True))
    return {"label_agreement": label_accuracy(chosen, rejected), "label_gold_gap": gap}


def rank_pool(pool: Pool, temperature: float, seed: int) -> list[list[dict[str, str]]]:
    """Each pool prompt's pairs from one simulated ranking, drawn from the prompt's own stream for `seed`."""
    from components.annotators import AnnotatorProfile
    from components.rankings import RankingSettings, rankings_to_pairs

    annotator = AnnotatorProfile("simulated", temperature=temperature)
    settings = RankingSettings(pairs="all", ties="drop")
    return [rankings_to_pairs([{**row, "ranks": annotator.rank(row["responses"], random.Random(f"{seed}:{i}"))}],
                              settings, "simulated annotator")
            for i, row in enumerate(pool)]  # fmt: skip


# ----------------------------------------------------------------------------------------------- reward models
class Models:
    """Reward models trained on sets of labelled prompts, cached by (prompts, seed) so the rounds strategies share
    (the seed batch) train once; each holds its held-out accuracies and, when asked, its scores of the pool."""

    def __init__(self, args: argparse.Namespace, work: Path, sft: str, pool: Pool, held_out: Any,
                 pref_eval: Any) -> None:
        self.args, self.work, self.sft, self.pool = args, work, sft, pool
        self.held_out, self.pref_eval = held_out, pref_eval
        self.pairs: list[list[dict[str, str]]] = []
        self.cache: dict[tuple[tuple[int, ...], int], dict[str, Any]] = {}
        self.trainings, self.train_seconds, self.score_seconds = 0, 0.0, 0.0

    def new_repeat(self, seed: int) -> None:
        """Fresh annotator rankings for repeat `seed`; drop the previous repeat's models."""
        self.pairs = rank_pool(self.pool, self.args.annotator_temperature, seed)
        for entry in self.cache.values():
            shutil.rmtree(entry["path"], ignore_errors=True)
        self.cache.clear()

    def get(self, prompts: list[int], seed: int) -> dict[str, Any]:
        """The reward model trained on the pairs of `prompts` (repeats allowed: a bootstrap) with `seed`."""
        key = (tuple(sorted(prompts)), seed)
        if key not in self.cache:
            self.cache[key] = self._train(prompts, seed)
        return self.cache[key]

    def _train(self, prompts: list[int], seed: int) -> dict[str, Any]:
        import yaml
        from datasets import Dataset
        from trl import RewardConfig

        from components.reward import train_reward_model

        pairs = [pair for p in prompts for pair in self.pairs[p]]
        cfg = yaml.safe_load((REPO / "conf/reward/default.yaml").read_text())["args"]
        cfg = {k: v for k, v in cfg.items() if k != "_target_"} | {"num_train_epochs": self.args.rm_epochs}
        path = self.work / "rm" / f"{len(self.cache)}"
        t0 = time.monotonic()
        train_reward_model(self.sft, Dataset.from_list(pairs),
                           RewardConfig(output_dir=str(self.work / "scratch"), seed=seed, **TRAINER, **cfg), path)
        self.trainings += 1
        self.train_seconds += time.monotonic() - t0
        return {"path": path, "n_pairs": len(pairs), "accuracy": None, "acc_pref_eval": None, "pool_scores": None}

    def evaluate(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The model's held-out accuracies (computed once): `accuracy` on the on-policy gold pairs, and
        `acc_pref_eval` on the gold-oriented preference_eval pairs."""
        from components.reward import pairwise_accuracy
        from components.scoring import RewardScorer

        if entry["accuracy"] is None:
            t0 = time.monotonic()
            scorer = RewardScorer(str(entry["path"]), "cpu", None)
            entry["accuracy"] = pairwise_accuracy(scorer, self.held_out, 128)["reward/eval_accuracy"]
            entry["acc_pref_eval"] = pairwise_accuracy(scorer, self.pref_eval, 128)["reward/eval_accuracy"]
            self.score_seconds += time.monotonic() - t0
        return entry

    def pool_scores(self, entry: dict[str, Any]) -> list[list[float]]:
        """The model's score of every pool response, `[prompt][response]` (computed once)."""
        from components.scoring import RewardScorer

        if entry["pool_scores"] is None:
            t0 = time.monotonic()
            scorer = RewardScorer(str(entry["path"]), "cpu", None)
            prompts = [row["prompt"] for row in self.pool for _ in row["responses"]]
            texts = [text for row in self.pool for text in row["responses"]]
            order = sorted(range(len(texts)), key=lambda i: len(prompts[i]) + len(texts[i]))  # less padding
            scored = scorer.score([prompts[i] for i in order], [texts[i] for i in order], 128)
            flat = [0.0] * len(texts)
            for i, value in zip(order, scored, strict=True):
                flat[i] = value
            k = self.args.k
            entry["pool_scores"] = [flat[i * k : (i + 1) * k] for i in range(len(self.pool))]
            self.score_seconds += time.monotonic() - t0
        return entry["pool_scores"]


def run_strategy(models: Models, strategy: str, seed: int, schedule: list[int]) -> list[dict[str, float]]:
    """One strategy's learning curve for repeat `seed`: a record per round (labels, pairs, accuracies)."""
    args = models.args
    labelled = random.Random(f"seed-batch:{seed}").sample(range(len(models.pool)), schedule[0])
    curve = []
    for step, labels in enumerate(schedule):
        current = models.evaluate(models.get(labelled, seed))
        curve.append({"labels": labels, "pairs": current["n_pairs"], "accuracy": current["accuracy"],
                      "acc_pref_eval": current["acc_pref_eval"],
                      **label_quality([pair for p in labelled for pair in models.pairs[p]])})  # fmt: skip
        if step + 1 == len(schedule):
            break
        members = [current]
        if strategy == "disagreement" or (strategy == "uncertainty" and args.uncertainty_ensemble):
            members += [models.get(bootstrap(labelled, seed * 1000 + 100 * step + m), seed + m)
                        for m in range(1, args.ensemble)]  # fmt: skip
        candidates = sorted(set(range(len(models.pool))) - set(labelled))
        per_member = [models.pool_scores(member) for member in members]
        scores = [[member[p] for member in per_member] for p in candidates]
        batch = schedule[step + 1] - labels
        if strategy == "uncertainty" and args.uncertainty_score == "information":
            labelled += [candidates[i] for i in most_informative(scores, batch)]
        else:
            labelled += select_from_pool(strategy, candidates, scores, batch, seed=seed * 1000 + step)
        print(f"  seed {seed} {strategy:12} labels {labels:4d} pairs {current['n_pairs']:5d} "
              f"accuracy {current['accuracy']:.4f}  ({models.trainings} models so far)", flush=True)
    print(f"  seed {seed} {strategy:12} labels {schedule[-1]:4d} pairs {curve[-1]['pairs']:5d} "
          f"accuracy {curve[-1]['accuracy']:.4f}", flush=True)
    return curve


# -------------------------------------------------------------------------------------------------- reporting
def shares(curves: dict[str, list[float]], schedule: list[int]) -> dict[str, float]:
    """Each active strategy's labels to reach random's final accuracy, as a share of random's (inf: never)."""
    out = {}
    for strategy, accuracy in curves.items():
        if strategy != "random":
            share = label_share(schedule, accuracy, schedule, curves["random"])
            out[strategy] = float("inf") if share is None else share
    return out


def log_mlflow(args: argparse.Namespace, work: Path, schedule: list[int], results: dict[str, dict[int, list]],
               means: dict[str, list[float]], share: dict[str, float], table: str, extra: dict[str, float]) -> str:
    """Log params, the curves (step = labels spent), the shares, the table and a plot to an MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from flows.tracking import init_tracking

    uri = args.tracking_uri or f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    artifact_root = None
    if uri.startswith("sqlite:///"):
        artifact_root = str(Path(uri.removeprefix("sqlite:///")).parent / "artifacts")
    experiment = init_tracking({"tracking_uri": uri, "artifact_root": artifact_root,
                                "experiment_name": args.experiment})  # fmt: skip
    with mlflow.start_run(experiment_id=experiment, run_name=f"bench_feedback{'-quick' if args.quick else ''}") as run:
        mlflow.log_params({k: v for k, v in vars(args).items() if k not in ("tracking_uri", "workdir")})
        for strategy, per_seed in results.items():
            for i, labels in enumerate(schedule):
                mlflow.log_metric(f"accuracy/{strategy}", means[strategy][i], step=labels)
                mlflow.log_metric(f"acc_pref_eval/{strategy}",
                                  statistics.fmean(c[i]["acc_pref_eval"] for c in per_seed.values()), step=labels)
                for name in ("label_agreement", "label_gold_gap"):
                    mlflow.log_metric(f"{name}/{strategy}",
                                      statistics.fmean(c[i][name] for c in per_seed.values()), step=labels)
                mlflow.log_metric(f"pairs/{strategy}",
                                  statistics.fmean(c[i]["pairs"] for c in per_seed.values()), step=labels)
                for seed, curve in per_seed.items():
                    mlflow.log_metric(f"accuracy/{strategy}/seed{seed}", curve[i]["accuracy"], step=labels)
        mlflow.log_metrics({f"labels_share/{s}": v for s, v in share.items() if v != float("inf")} | extra)
        mlflow.set_tags({f"labels_share/{s}": "never" for s, v in share.items() if v == float("inf")})
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for strategy, per_seed in results.items():
            (line,) = ax.plot(schedule, means[strategy], marker="o", label=f"{strategy} (mean of {len(per_seed)})")
            for curve in per_seed.values():
                ax.plot(schedule, [r["accuracy"] for r in curve], color=line.get_color(), alpha=0.25, lw=1)
        ax.axhline(means["random"][-1], color="grey", ls="--", lw=1, label="random's final accuracy")
        ax.axvline(0.6 * schedule[-1], color="grey", ls=":", lw=1, label="goal: 60% of random's labels")
        ax.set_xlabel("labels spent (prompts ranked, K responses each)")
        ax.set_ylabel("held-out pairwise accuracy (gold order)")
        ax.set_title("Reward-model accuracy against labels spent")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        mlflow.log_figure(fig, "feedback_curve.png")
        plt.close(fig)
        mlflow.log_text(table, "feedback_table.txt")
        mlflow.log_dict({s: {str(k): v for k, v in c.items()} for s, c in results.items()}, "feedback_curves.json")
        return f"{uri} run {run.info.run_id}"


# ------------------------------------------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    """Command-line settings; `--quick` shrinks everything for a ~2 min check."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="repeats (seed batch, annotator, RM seed)")
    p.add_argument("--pool", type=int, default=600, help="candidate prompts")
    p.add_argument("--k", type=int, default=4, help="responses per prompt")
    p.add_argument("--seed-batch", type=int, default=20, help="randomly chosen prompts labelled first")
    p.add_argument("--batch", type=int, default=20, help="prompts labelled per round after the seed batch")
    p.add_argument("--budget", type=int, default=120, help="prompts labelled in all (random's final labels)")
    p.add_argument("--ensemble", type=int, default=3, help="reward models behind `disagreement`")
    p.add_argument("--uncertainty-ensemble", action="store_true", help="uncertainty on the ensemble's mean score")
    p.add_argument("--uncertainty-score", choices=("gap", "information"), default="gap",
                   help="uncertainty by the smallest margin (select_prompts) or by pair_information (all pairs)")
    p.add_argument("--annotator-temperature", type=float, default=0.2, help="Plackett–Luce noise of the rankings")
    p.add_argument("--rm-epochs", type=float, default=3.0)
    p.add_argument("--sft-epochs", type=float, default=3.0)
    p.add_argument("--n-sft", type=int, default=2000, help="demonstrations for the SFT model")
    p.add_argument("--eval-prompts", type=int, default=150, help="held-out prompts (K(K-1)/2 gold pairs each)")
    p.add_argument("--eval-preference", type=int, default=300, help="preference_eval pairs (logged only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--workdir", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite in <workdir>/mlruns)")
    p.add_argument("--experiment", default="bench_feedback", help="MLflow experiment name")
    p.add_argument("--quick", action="store_true", help="a ~2 min run: small pool, budget and models, one seed")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.pool, args.seed_batch, args.batch, args.budget = args.seeds[:1], 150, 15, 15, 45
        args.n_sft, args.sft_epochs, args.eval_prompts, args.eval_preference = 600, 2.0, 60, 100
    return args


def main(argv: list[str]) -> None:
    """Build the task, run every strategy for every repeat, print and log the curves."""
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import datasets
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="alignflow-bench-feedback-"))
    work.mkdir(parents=True, exist_ok=True)
    schedule = label_schedule(args.seed_batch, args.batch, args.budget)
    if "random" not in args.strategies:
        args.strategies = ["random", *args.strategies]

    t0 = time.monotonic()
    sft, pool, held_out, pref_eval = build_task(args, work)
    setup_s = time.monotonic() - t0
    print(f"set-up {setup_s:.0f} s: SFT model, pool {len(pool)} prompts x {args.k}, held-out {len(held_out)} "
          f"on-policy gold pairs + {len(pref_eval)} preference_eval pairs; schedule {schedule}", flush=True)
    if len(pool) < args.budget:
        raise SystemExit(f"the pool ({len(pool)}) is smaller than the budget ({args.budget})")
    models = Models(args, work, sft, pool, held_out, pref_eval)
    results: dict[str, dict[int, list[dict[str, float]]]] = {s: {} for s in args.strategies}
    for seed in args.seeds:
        models.new_repeat(seed)
        for strategy in args.strategies:
            results[strategy][seed] = run_strategy(models, strategy, seed, schedule)
    models.new_repeat(seed=-1)  # frees the last repeat's models
    wall = time.monotonic() - t0

    means = {s: mean_curve([[r["accuracy"] for r in c] for c in per_seed.values()]) for s, per_seed in
             results.items()}  # fmt: skip
    lines = [f"\nannotation-cost benchmark: pool {len(pool)} x K={args.k}, seeds {args.seeds}, ensemble "
             f"{args.ensemble}{' (uncertainty too)' if args.uncertainty_ensemble else ''}, uncertainty by "
             f"{args.uncertainty_score}, annotator T={args.annotator_temperature}, torch threads "
             f"{torch.get_num_threads()}",
             "held-out accuracy (mean over seeds; per seed in brackets) by labels spent (prompts ranked):",
             f"{'labels':>6} {'pairs':>6} " + " ".join(f"{s:>28}" for s in args.strategies)]  # fmt: skip
    for i, labels in enumerate(schedule):
        pairs = statistics.fmean(c[i]["pairs"] for c in results["random"].values())
        cells = []
        for strategy in args.strategies:
            per = " ".join(f"{c[i]['accuracy']:.3f}" for c in results[strategy].values())
            cells.append(f"{means[strategy][i]:.4f} [{per}]")
        lines.append(f"{labels:6d} {pairs:6.0f} " + " ".join(f"{c:>28}" for c in cells))
    for strategy in args.strategies:
        final = [c[-1] for c in results[strategy].values()]
        lines.append(f"{strategy:12} labels bought: pairs agreeing with gold "
                     f"{statistics.fmean(r['label_agreement'] for r in final):.3f}, mean gold gap "
                     f"{statistics.fmean(r['label_gold_gap'] for r in final):.3f}")
    share = shares(means, schedule)
    for seed in args.seeds:
        per_seed = shares({s: [r["accuracy"] for r in results[s][seed]] for s in args.strategies}, schedule)
        lines.append(f"seed {seed}: labels to reach random's final accuracy "
                     f"{results['random'][seed][-1]['accuracy']:.4f}, as a share of random's {schedule[-1]}: "
                     + ", ".join(f"{s} {v:.2f}" for s, v in per_seed.items()))  # fmt: skip
    lines.append(f"mean curves: random's final accuracy {means['random'][-1]:.4f} at {schedule[-1]} labels; "
                 + ", ".join(f"{s} reaches it at {v * schedule[-1]:.0f} ({v:.2f})" if v != float("inf")
                             else f"{s} never does" for s, v in share.items())
                 + "  (goal <= 0.60)")  # fmt: skip
    lines.append(f"wall {wall:.0f} s (set-up {setup_s:.0f} s, {models.trainings} reward models trained in "
                 f"{models.train_seconds:.0f} s, scoring {models.score_seconds:.0f} s); work folder {work}")
    table = "\n".join(lines)
    print(table)
    extra = {"wall_seconds": wall, "reward_models_trained": float(models.trainings)}
    where = log_mlflow(args, work, schedule, results, means, share, table, extra)
    print(f"MLflow: {where} (metrics accuracy/<strategy> by labels, artifact feedback_curve.png)")
    (work / "feedback_curves.json").write_text(json.dumps(results, indent=1))
    print("labels_share " + " ".join(f"{s}={v:.2f}" for s, v in share.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
