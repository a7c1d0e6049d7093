"""`alignflow-compare`: one view of a sweep, or of any pipeline runs, with a verdict.

A pandas table of runs × headline metrics (the registry's `Stage.headline`, the chosen metric first), the config
diff against a baseline run, a one-paragraph verdict (which run wins on the metric, by how much over the
runner-up and the baseline, at what KL, and whether the held-out prompts tell them apart), and plots: the
reward–KL frontier per variant, the over-optimisation view with Gao et al.'s fitted gold curve, and the policies'
training curves. Printed, saved as CSV, HTML and PNG, and logged on the sweep run. The sweep callback
(`flows.sweep`) calls the same code at the end of `-m`.

    alignflow-compare                         # the latest sweep
    alignflow-compare alignflow               # every pipeline run of the experiment `alignflow`
    alignflow-compare <sweep run id>          # one sweep
    alignflow-compare <run id> <run id> …     # chosen pipeline runs (--baseline picks the reference)
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from components.stats import STDERR, difference_stderr
from flows.plots import KL, Overoptimization, curves_figure, frontier_figure, overoptimization_figure

DEFAULT_METRIC = "eval/win_rate_vs_sft"
SWEEP_TAG = "alignflow.sweep"
POLICY_STAGES = ("ppo", "rloo", "grpo", "dpo")
CURVES = (("mean_reward", "reward", "rewards/margins"), ("kl", "loss"))  # per policy stage: a reward, a KL curve
PLOT_METRICS = ("eval/proxy_reward_mean", "eval/proxy_reward_mean_sft")  # what the over-optimisation view needs


@dataclass
class Comparison:
    """What `compare` found: tables, verdict, figures (and where the files went)."""

    table: pd.DataFrame  # index: run name; run_id, status, variant, then headline metrics
    diff: pd.DataFrame  # index: run name; the config keys whose value differs from the baseline's
    metric: str
    mode: str
    baseline: str
    best: str | None
    verdict: str
    figures: dict[str, Figure] = field(default_factory=dict)
    overoptimization: Overoptimization | None = None
    out_dir: Path | None = None
    seeds: pd.DataFrame = field(default_factory=pd.DataFrame)  # variants × seeds: mean, standard error (see seed_table)

    def report(self) -> str:
        """The printed view: table, config diff, verdict and where the files are."""
        shown = self.table.assign(run_id=self.table["run_id"].str[:8])
        lines = [f"== compare: {len(self.table)} run(s); metric {self.metric} ({_better(self.mode)}) ==",
                 shown.to_string(float_format=lambda v: f"{v:.4g}"), "",
                 f"config diff against the baseline `{self.baseline}`:",
                 self.diff.to_string() if not self.diff.empty else "  (no differences)", ""]
        if not self.seeds.empty:
            lines += [f"over seeds ({self.metric}: mean and standard error over each variant's seeds):",
                      self.seeds.drop(columns="runs").to_string(float_format=lambda v: f"{v:.4g}"), ""]
        lines.append(self.verdict)
        if self.out_dir is not None:
            lines.append(f"saved: {self.out_dir} (compare.csv, config_diff.csv, compare.html, "
                         f"{', '.join(f'{n}.png' for n in self.figures)})")
        return "\n".join(lines)


def _better(mode: str) -> str:
    return "higher is better" if mode == "max" else "lower is better"


def sweep_jobs(client: MlflowClient, sweep: Run) -> list[Run]:
    """The pipeline runs of one sweep, in the order they started."""
    return client.search_runs([sweep.info.experiment_id], order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'", max_results=1000)


def latest_sweep(client: MlflowClient, experiment_id: str) -> Run:
    """The sweep run that started last in the experiment."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` LIKE '%'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise LookupError("no sweep in this store yet: run `alignflow -m …`, or name an experiment or run ids")
    return found[0]


def find_runs(client: MlflowClient, experiment_id: str, targets: list[str]) -> tuple[list[Run], str | None]:
    """The pipeline runs `targets` name (none: the latest sweep) and the sweep run to log on (or None)."""
    if not targets:
        sweep = latest_sweep(client, experiment_id)
        return sweep_jobs(client, sweep), sweep.info.run_id
    if len(targets) == 1 and (experiment := client.get_experiment_by_name(targets[0])) is not None:
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`alignflow.pipeline` LIKE '%'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
        return runs, None
    runs = []
    for target in targets:
        try:
            runs.append(client.get_run(target))
        except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types
            raise LookupError(f"`{target}` is neither an experiment nor a run id in this store") from err
    if len(runs) == 1 and SWEEP_TAG in runs[0].data.tags:
        return sweep_jobs(client, runs[0]), runs[0].info.run_id
    return sorted(runs, key=lambda r: r.info.start_time), None


def run_record(client: MlflowClient, run: Run) -> dict[str, Any]:
    """A pipeline run with its stage runs' metrics merged in (its own win), flat config and policy stage run."""
    stages = client.search_runs([run.info.experiment_id], max_results=100,
                                filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    metrics: dict[str, float] = {}
    for stage in stages:
        metrics.update(stage.data.metrics)
    metrics.update(run.data.metrics)
    policy = next((s for s in stages if s.data.tags.get("alignflow.stage") in POLICY_STAGES), None)
    return {"run": run, "metrics": metrics, "config": run_config(client, run), "policy": policy}


def run_config(client: MlflowClient, run: Run) -> dict[str, str]:
    """The run's full config, flattened, from its `config.yaml` artifact (its params where that is missing)."""
    from flows.tracking import flatten

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
            return flatten(yaml.safe_load(Path(path).read_text()) or {})
        except Exception:  # noqa: BLE001 - a run of an older alignflow, or a store without artifacts
            return dict(run.data.params)


def variant(record: dict[str, Any]) -> str:
    """`rlhf/ppo`, `rlaif/grpo`, `dpo`, …: the pipeline and, where it has one, its RL algorithm."""
    config, tags = record["config"], record["run"].data.tags
    pipeline = config.get("pipeline.name") or tags.get("alignflow.pipeline", "?")
    if config.get("pipeline.optimizer", "rl") == "rl" and config.get("rl.algorithm"):
        return f"{pipeline}/{config['rl.algorithm']}"
    return pipeline


def unique_labels(records: list[dict[str, Any]]) -> list[str]:
    """Run names, with a short id added where two runs share one."""
    names = [r["run"].info.run_name or r["run"].info.run_id[:8] for r in records]
    return [f"{n} ({r['run'].info.run_id[:6]})" if names.count(n) > 1 else n
            for n, r in zip(names, records, strict=True)]


def headline_columns(metric: str, present: set[str]) -> list[str]:
    """The chosen metric, then eval's headline, then every other stage's, as far as the runs have them."""
    from flows.stages import STAGES

    names = [metric, metric + STDERR, *STAGES["eval"].headline, *PLOT_METRICS]
    for stage in STAGES.values():
        names.extend(stage.headline)
    return [n for n in dict.fromkeys(names) if n in present]


def metrics_table(records: list[dict[str, Any]], labels: list[str], metric: str) -> pd.DataFrame:
    """Runs × headline metrics; columns other than eval's that are the same for every run are left out."""
    present = {k for r in records for k in r["metrics"]}
    columns = headline_columns(metric, present)
    table = pd.DataFrame([{c: r["metrics"].get(c) for c in columns} for r in records], index=labels,
                         columns=columns, dtype=float)
    if len(table) > 1:
        constant = [c for c in columns if not c.startswith("eval/") and c != metric and table[c].nunique() <= 1]
        table = table.drop(columns=constant)
    info = pd.DataFrame({"run_id": [r["run"].info.run_id for r in records],
                         "status": [r["run"].info.status for r in records],
                         "variant": [variant(r) for r in records]}, index=labels)
    table = pd.concat([info, table], axis=1)
    table.index.name = "run"
    return table


def config_diff(records: list[dict[str, Any]], labels: list[str], baseline: int) -> pd.DataFrame:
    """Runs × the config keys where some run differs from the baseline run (`—`: the key is absent)."""
    configs = [r["config"] for r in records]
    base = configs[baseline]
    keys = [k for k in dict.fromkeys(k for c in configs for k in c) if any(c.get(k) != base.get(k) for c in configs)]
    diff = pd.DataFrame([{k: c.get(k, "—") for k in keys} for c in configs], index=labels, columns=keys)
    diff.index.name = "run"
    return diff


def baseline_index(records: list[dict[str, Any]], labels: list[str], baseline: str | None) -> int:
    """Which run is the baseline: `baseline` as a run id (or its prefix) or name; by default the first run."""
    if baseline is None:
        return 0
    for i, (record, label) in enumerate(zip(records, labels, strict=True)):
        if record["run"].info.run_id.startswith(baseline) or label == baseline:
            return i
    raise LookupError(f"--baseline {baseline}: no compared run has that id or name")


def verdict(table: pd.DataFrame, metric: str, mode: str, baseline: str) -> tuple[str, str | None]:
    """Which run wins on `metric`, at what KL, by how much over the runner-up and the baseline, whether the held-out
    prompts tell them apart (where the runs logged the metric's standard error); and the winner's name."""
    values = table[metric].dropna() if metric in table else pd.Series(dtype=float)
    if values.empty:
        return f"Verdict: no run has {metric}; nothing to rank ({len(table)} run(s), see status).", None
    ranked = values.sort_values(ascending=mode == "min", kind="stable")
    best, value = str(ranked.index[0]), float(ranked.iloc[0])
    at = f" at {KL}={table.at[best, KL]:.4g}" if KL in table and pd.notna(table.at[best, KL]) else ""
    parts = [f"Verdict: `{best}` wins on {metric} ({_better(mode)}) with {value:.4g}{at}"]
    close = ""
    if len(ranked) > 1:
        second = str(ranked.index[1])
        role = "the runner-up and baseline" if second == baseline else "the runner-up"
        z = separation(table, metric, best, second)
        parts.append(_versus(role, second, value, float(ranked.iloc[1]), z))
        if z is not None and z < NOISE_Z:
            close = (f" The held-out prompts do not tell `{best}` from `{second}` apart (under {NOISE_Z:g} standard "
                     "errors): evaluate on more prompts (eval.max_prompts) or compare over seeds before choosing.")
    if best == baseline:
        parts.append("it is the baseline")
    elif baseline in ranked.index and baseline != ranked.index[1]:
        z = separation(table, metric, best, baseline)
        parts.append(_versus("the baseline", baseline, value, float(ranked[baseline]), z))
    elif baseline not in ranked.index:
        parts.append(f"the baseline `{baseline}` has no {metric}")
    missing = len(table) - len(ranked)
    tail = f" {missing} run(s) have no {metric} (failed or not evaluated)." if missing else ""
    return "; ".join(parts) + "." + close + tail, best


SEED_KEYS = ("seed", "data_seed")  # config keys that only pick random streams: runs differing there are replicates


def replicate_key(config: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The run's config without its seed keys (`seed`, `rl.seed`, `sft.args.data_seed`, …): equal for replicates."""
    return tuple(sorted((k, str(v)) for k, v in config.items() if k.rsplit(".", 1)[-1] not in SEED_KEYS))


def seed_table(records: list[dict[str, Any]], labels: list[str], table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Variants × their seeds, where some variant ran with several: runs whose configs differ only in seed keys form
    one variant, with its number of seeds, the metric's mean, its standard error over the seeds (sample std / √n:
    training and evaluation luck together) and the mean KL. Empty when every variant ran once."""
    groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(replicate_key(record["config"]), []).append(i)
    if metric not in table or all(len(members) < 2 for members in groups.values()):
        return pd.DataFrame()
    rows = []
    for members in groups.values():
        values = table[metric].iloc[members].dropna()
        rows.append({"variant": re.sub(r"\s*\bseed=\S+", "", labels[members[0]]).strip() or labels[members[0]],
                     "seeds": len(values), "mean": values.mean(),
                     "stderr": values.std(ddof=1) / len(values) ** 0.5 if len(values) > 1 else float("nan"),
                     KL: table[KL].iloc[members].mean() if KL in table else float("nan"),
                     "runs": ", ".join(labels[m] for m in members)})
    frame = pd.DataFrame(rows)
    if frame["variant"].duplicated().any():  # names that differed only in other keys: keep the runs' names
        frame["variant"] = frame["runs"]
    return frame.set_index("variant")


def seed_verdict(seeds: pd.DataFrame, mode: str) -> str:
    """One sentence ranking the variants by their mean over seeds, and whether the top two are apart ('' for none)."""
    ranked = seeds.dropna(subset=["mean"]).sort_values("mean", ascending=mode == "min", kind="stable")
    if len(ranked) < 2:
        return ""
    best, second = ranked.iloc[0], ranked.iloc[1]
    first, runner = str(ranked.index[0]), str(ranked.index[1])
    text = (f"Over seeds: `{first}` leads with {_pooled(best)}, {best['mean'] - second['mean']:+.3g} over "
            f"`{runner}` ({_pooled(second)})")
    spread = difference_stderr(best["stderr"], second["stderr"])
    if not spread > 0:
        return text + "; a variant with one seed has no spread to judge by."
    z = abs(best["mean"] - second["mean"]) / spread
    return text + (f"; {z:.2g} standard errors over seeds" +
                   (": within the seeds' noise, run more seeds to tell them apart." if z < NOISE_Z else "."))


def _pooled(row: pd.Series) -> str:
    spread = f" ± {row['stderr']:.2g}" if pd.notna(row["stderr"]) else ""
    return f"{row['mean']:.4g}{spread} over {int(row['seeds'])} seed{'s' if row['seeds'] != 1 else ''}"


NOISE_Z = 2.0  # differences under this many standard errors are read as evaluation noise (about 95%, two-sided)


def separation(table: pd.DataFrame, metric: str, a: str, b: str) -> float | None:
    """|metric(a) − metric(b)| in standard errors of the difference, sqrt(se_a² + se_b²), from the runs' logged
    `<metric>_stderr` (taken as independent; runs sharing an SFT model are correlated, which makes this cautious);
    None where either run has no standard error."""
    column = metric + STDERR
    if column not in table or table.loc[[a, b], column].isna().any():
        return None
    spread = difference_stderr(float(table.at[a, column]), float(table.at[b, column]))
    gap = abs(float(table.at[a, metric]) - float(table.at[b, metric]))
    return gap / spread if spread > 0 else (0.0 if gap == 0 else float("inf"))


def _versus(role: str, name: str, value: float, other: float, z: float | None = None) -> str:
    noise = "" if z is None else f"; {z:.2g} standard errors" + (", within evaluation noise" if z < NOISE_Z else "")
    if value == other:
        return f"tied with {role} `{name}` ({other:.4g}{noise}; the earlier run is named)"
    return f"{value - other:+.3g} over {role} `{name}` ({other:.4g}{noise})"


def overoptimization_note(found: Overoptimization | None) -> str:
    """One sentence on reward hacking from the over-optimisation view ('' without RL runs)."""
    if found is None:
        return ""
    parts = [f"Over-optimisation ({found.n_runs} RL run(s)):"]
    if found.fit is None:
        parts.append("too few distinct KLs for the Gao fit;")
    else:
        fit = found.fit
        peak = f"gold peaks at KL≈{fit.peak_kl:.3g}" if fit.peak_kl is not None else "gold has not peaked yet"
        parts.append(f"gold fit d(α − β ln d) with α={fit.alpha:.3g}, β={fit.beta:.3g}: {peak};")
    if found.onset_kl is None:
        parts.append("proxy and gold never part (no reward hacking seen).")
    else:
        parts.append(f"beyond KL≈{found.onset_kl:.3g} the proxy keeps rising while the gold falls (reward hacking).")
    return " ".join(parts)


def training_curves(client: MlflowClient, records: list[dict[str, Any]], labels: list[str]) -> dict[str, dict]:
    """Per run, the policy stage's reward and KL curves by step (a reused stage's come from its producer)."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for record, label in zip(records, labels, strict=True):
        policy = record["policy"]
        if policy is None:
            continue
        stage = policy.data.tags["alignflow.stage"]
        source = policy.data.tags.get("alignflow.source_run") or policy.info.run_id
        try:
            logged = client.get_run(source).data.metrics
        except Exception:  # noqa: BLE001 - the producer run was deleted
            continue
        per_run = {}
        for kinds in CURVES:
            name = next((f"{stage}/{k}" for k in kinds if f"{stage}/{k}" in logged), None)
            if name is not None:
                per_run[name] = [(m.step, m.value) for m in client.get_metric_history(source, name)]
        curves[label] = per_run
    return curves


def make_figures(client: MlflowClient, table: pd.DataFrame, records: list[dict[str, Any]],
                 labels: list[str], metric: str) -> tuple[dict[str, Figure], Overoptimization | None]:
    """The frontier, over-optimisation and training-curve figures the runs allow."""
    figures: dict[str, Figure] = {}
    frontier = frontier_figure(table, metric)
    if frontier is not None:
        figures["frontier"] = frontier
    overopt = overoptimization_figure(table)
    if overopt is not None:
        figures["overoptimization"] = overopt.figure
    curves = curves_figure(training_curves(client, records, labels))
    if curves is not None:
        figures["training_curves"] = curves
    return figures, overopt


def compare(client: MlflowClient, runs: list[Run], metric: str = DEFAULT_METRIC, mode: str = "max",
            baseline: str | None = None, out_dir: Path | None = None, log_to: str | None = None) -> Comparison:
    """Compare `runs` (pipeline runs): tables, verdict, figures; saved under `out_dir`, logged on `log_to`."""
    if not runs:
        raise LookupError("no pipeline runs to compare")
    if mode not in ("max", "min"):
        raise ValueError(f"mode {mode!r}: use max or min")
    records = [run_record(client, r) for r in runs]
    labels = unique_labels(records)
    table = metrics_table(records, labels, metric)
    base = baseline_index(records, labels, baseline)
    text, best = verdict(table, metric, mode, labels[base])
    seeds = seed_table(records, labels, table, metric)
    figures, overopt = make_figures(client, table, records, labels, metric)
    text = "\n".join(t for t in (text, seed_verdict(seeds, mode) if not seeds.empty else "",
                                  overoptimization_note(overopt)) if t)
    cmp = Comparison(table, config_diff(records, labels, base), metric, mode, labels[base], best, text, figures,
                     overopt, seeds=seeds)
    if out_dir is not None:
        write_outputs(cmp, Path(out_dir))
    if log_to is not None:
        log_on_run(client, log_to, cmp)
    return cmp


def write_outputs(cmp: Comparison, out_dir: Path) -> None:
    """compare.csv, config_diff.csv, compare.html, verdict.txt and one PNG per figure, in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmp.table.to_csv(out_dir / "compare.csv")
    cmp.diff.to_csv(out_dir / "config_diff.csv")
    if not cmp.seeds.empty:
        cmp.seeds.to_csv(out_dir / "seeds.csv")
    (out_dir / "verdict.txt").write_text(cmp.verdict + "\n")
    for name, figure in cmp.figures.items():
        figure.savefig(out_dir / f"{name}.png", dpi=110)
    images = "".join(f'<h2>{name.replace("_", " ")}</h2><img src="{name}.png" alt="{name}">' for name in cmp.figures)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>alignflow compare</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:90%}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} img{max-width:100%}</style></head><body>"
            f"<h1>alignflow compare: {len(cmp.table)} run(s)</h1>"
            f"<p>{html.escape(cmp.verdict).replace(chr(10), '<br>')}</p>"
            f"<h2>runs × headline metrics ({html.escape(cmp.metric)}, {_better(cmp.mode)})</h2>"
            f"{cmp.table.to_html(float_format=lambda v: f'{v:.4g}', na_rep='')}"
            f"<h2>config diff against the baseline <code>{html.escape(cmp.baseline)}</code></h2>"
            f"{cmp.diff.to_html() if not cmp.diff.empty else '<p>no differences</p>'}"
            + ("" if cmp.seeds.empty else "<h2>over seeds (mean, standard error over each variant's seeds)</h2>"
               + cmp.seeds.to_html(float_format=lambda v: f"{v:.4g}", na_rep=""))
            + f"{images}</body></html>")
    (out_dir / "compare.html").write_text(page)
    cmp.out_dir = out_dir


def log_on_run(client: MlflowClient, run_id: str, cmp: Comparison) -> None:
    """Log the comparison on the sweep run: files under `compare/`, the verdict as a tag, the winner's headline
    numbers as `best/<metric>` (prefixed, so charts do not show the winning run twice) and the Gao fit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = cmp.out_dir or Path(tmp)
        if cmp.out_dir is None:
            write_outputs(cmp, out)
        for name in ("compare.csv", "config_diff.csv", "compare.html", "verdict.txt", "seeds.csv"):
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name), "compare")
        for name, figure in cmp.figures.items():
            client.log_figure(run_id, figure, f"compare/{name}.png")
    client.set_tag(run_id, "alignflow.verdict", cmp.verdict[:5000])
    numbers: dict[str, float] = {}
    if cmp.best is not None:
        client.set_tag(run_id, "alignflow.best_run", cmp.table.at[cmp.best, "run_id"])
        client.set_tag(run_id, "alignflow.best_name", cmp.best)
        row = cmp.table.loc[cmp.best].drop(["run_id", "status", "variant"]).dropna()
        numbers.update({f"best/{k}": float(v) for k, v in row.items()})
    found = cmp.overoptimization
    if found is not None and found.fit is not None:
        numbers.update({"overopt/alpha": found.fit.alpha, "overopt/beta": found.fit.beta})
        if found.fit.peak_kl is not None:
            numbers["overopt/gold_peak_kl"] = found.fit.peak_kl
    if found is not None and found.onset_kl is not None:
        numbers["overopt/onset_kl"] = found.onset_kl
    from flows.tracking import log_metrics

    log_metrics(run_id, numbers)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="alignflow-compare", description=__doc__.split("\n\n")[0],
                                     epilog="The store is the one `alignflow` uses (ALIGNFLOW_ROOT, else the cwd).")
    parser.add_argument("targets", nargs="*", help="nothing (the latest sweep), an experiment name, a sweep run "
                                                   "id, or pipeline run ids")
    parser.add_argument("--baseline", help="run id (or prefix) or name of the reference run (default: the first)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"what decides the winner (default {DEFAULT_METRIC})")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="max: higher is better (default)")
    parser.add_argument("--out", type=Path, help="where the CSV, HTML and PNG files go (default: "
                                                 "<root>/compare/<sweep or first run id>)")
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison on the sweep run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The `alignflow-compare` console script."""
    args = parse_args(argv)
    from flows.config import compose_config

    cfg = compose_config([])
    tracking = cfg["tracking"]
    db = tracking["tracking_uri"].removeprefix("sqlite:///")
    if tracking["tracking_uri"].startswith("sqlite:///") and not Path(db).is_file():
        print(f"alignflow-compare: no MLflow store at {db} (set ALIGNFLOW_ROOT to the root alignflow wrote to)",
              file=sys.stderr)
        return 2
    client = MlflowClient(tracking["tracking_uri"])
    try:
        experiment = client.get_experiment_by_name(tracking["experiment_name"])
        runs, sweep = find_runs(client, experiment.experiment_id if experiment else "0", list(args.targets))
        label = sweep or (runs[0].info.run_id if runs else "none")
        out = args.out or Path(cfg["paths"]["root_dir"]) / "compare" / label
        cmp = compare(client, runs, args.metric, args.mode, args.baseline, out, None if args.no_log else sweep)
    except (LookupError, ValueError) as err:
        print(f"alignflow-compare: {err}", file=sys.stderr)
        return 2
    print(cmp.report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
