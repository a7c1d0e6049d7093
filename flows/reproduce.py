"""`alignflow-reproduce RUN_ID`: rerun a recorded pipeline run in a fresh store and compare every metric.

From the pipeline run it reads the composed config (`config.yaml` artifact), the overrides (`alignflow.overrides`
tag), the code (`mlflow.source.git.commit` tag) and the package versions (`packages.json` artifact), and warns
where today's code or packages differ. It reruns the recorded config with only its store moved to a new
ALIGNFLOW_ROOT (a temporary folder, or an empty `--root`): no stage can be reused, everything is rebuilt. Groups
added to the config since then get today's defaults (with a warning). Finally it prints each metric of the
pipeline run and its stage runs side by side; timings, memory and store bookkeeping (`*seconds*`, `*peak_rss*`,
`pipeline/*`, `register/*`) are listed apart and never compared.

Exit status: 0 when every `eval/*` metric matches within `--tolerance` (default 0: exactly), 1 when one differs
or is missing, 2 on bad input (unknown run, no recorded config, a non-empty `--root`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Numbers that measure the machine or the store rather than the result: shown, never compared.
VOLATILE = re.compile(r"seconds|runtime|per_second|peak_rss|^pipeline/|^register/")


class ReproduceError(Exception):
    """Bad input: the message says what to do."""


def flat(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: leaf value}."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` laid over `base`, node by node: keys only `base` has (config added since) are kept."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = overlay(base[key], value) if both else value
    return out


def compare_metrics(original: dict[str, float], reproduced: dict[str, float],
                    tolerance: float = 0.0) -> list[dict[str, Any]]:
    """One row per metric name of either side: values, |difference|, whether it counts (not volatile) and
    whether it differs (beyond `tolerance`, or present on one side only; two NaNs are equal)."""
    rows = []
    for name in sorted(set(original) | set(reproduced)):
        a, b = original.get(name), reproduced.get(name)
        if a is None or b is None:
            diff, differs = math.inf, True
        elif math.isnan(a) and math.isnan(b):
            diff, differs = 0.0, False
        else:
            diff = abs(a - b)
            differs = not diff <= tolerance
        rows.append({"metric": name, "original": a, "reproduced": b, "diff": diff, "differs": differs,
                     "compared": VOLATILE.search(name) is None})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The comparison as a table: compared metrics first (differences marked `!`), then the volatile ones."""
    def value(v: float | None) -> str:
        return "—" if v is None else f"{v:.6g}"

    lines = [f"  {'metric':<44} {'original':>12} {'reproduced':>12} {'|diff|':>10}"]
    for compared in (True, False):
        if not compared:
            lines.append("  not compared (timings, store bookkeeping):")
        for r in (r for r in rows if r["compared"] is compared):
            mark = "!" if compared and r["differs"] else " "
            lines.append(f"{mark} {r['metric']:<44} {value(r['original']):>12} {value(r['reproduced']):>12} "
                         f"{value(r['diff']) if r['diff'] != math.inf else 'missing':>10}")
    return "\n".join(lines)


def code_warnings(then: str, now: str) -> list[str]:
    """Why today's code may not be the run's: another commit, uncommitted changes then or now, no git."""
    out = []
    if "unknown" in (then, now):
        out.append(f"the code version cannot be compared (commit then: {then}, now: {now})")
    elif then.removesuffix("-dirty") != now.removesuffix("-dirty"):
        out.append(f"code differs: the run was made at commit {then}, this checkout is at {now}")
    if then.endswith("-dirty"):
        out.append("the run was made from uncommitted changes, which were not recorded")
    if now.endswith("-dirty"):
        out.append("this checkout has uncommitted changes")
    return out


def package_warnings(then: dict[str, str], now: dict[str, str]) -> list[str]:
    """One line per package whose version differs from the run's."""
    return [f"package {name}: {then.get(name, 'absent')} then, {now.get(name, 'absent')} now"
            for name in sorted(set(then) | set(now)) if then.get(name) != now.get(name)]


def _stage_metrics(client: Any, child: Any) -> dict[str, float]:
    """A stage run's metrics; a reused stage's are its producer's (which also has the curves it logged)."""
    source = child.data.tags.get("alignflow.source_run")
    if child.data.tags.get("alignflow.cached") == "true" and source:
        try:
            return {**child.data.metrics, **client.get_run(source).data.metrics}
        except Exception:  # noqa: BLE001 - the producer run was deleted: the copied metrics remain
            pass
    return dict(child.data.metrics)


def run_metrics(client: Any, run: Any) -> dict[str, float]:
    """A pipeline run's metrics with those of its stage runs (a metric another stage logs, such as sft_cai's
    `sft/*`, is named `<stage>:<metric>`)."""
    metrics = dict(run.data.metrics)
    children = client.search_runs([run.info.experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    for child in children:
        stage = child.data.tags.get("alignflow.stage", child.info.run_name)
        for key, value in _stage_metrics(client, child).items():
            metrics.setdefault(key if key.split("/")[0] == stage else f"{stage}:{key}", value)
    return metrics


def read_run(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """What a pipeline run recorded: composed config, overrides, git commit, package versions, metrics."""
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ReproduceError(f"no MLflow store at {tracking_uri}: give the run's store with --from-root or "
                             "--tracking-uri")
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ReproduceError(f"run {run_id} is not in {tracking_uri}: check the id and the store") from err
    if "alignflow.pipeline" not in run.data.tags:
        raise ReproduceError(f"run {run_id} is not a pipeline run (a stage or sweep run?): give a pipeline run's id")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text())
            packages = json.loads(Path(client.download_artifacts(run_id, "packages.json", tmp)).read_text())
        except (MlflowException, OSError) as err:
            raise ReproduceError(f"run {run_id} has no readable config.yaml / packages.json artifact") from err
    return {"config": config, "packages": packages, "metrics": run_metrics(client, run),
            "overrides": json.loads(run.data.tags.get("alignflow.overrides", "[]")),
            "commit": run.data.tags.get("mlflow.source.git.commit", "unknown")}


def rebuild_config(recorded: dict[str, Any], overrides: list[str], root: Path) -> tuple[dict[str, Any], list[str]]:
    """The recorded config with its store moved to `root` (paths, tracking URI and artifact root); groups added
    since the run take today's defaults. Returns it with notes on where today's composition differs."""
    from flows.config import compose_config

    moved = [f"paths.root_dir='{root}'"]
    store = compose_config(moved)  # today's layout of a store at `root`
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("paths.", "tracking."))]
    notes = []
    try:
        today = compose_config([*kept, *moved])
    except Exception as err:  # noqa: BLE001 - e.g. an option removed since: the recorded config still runs
        today = store
        notes.append(f"today's config cannot compose the run's overrides ({' '.join(str(err).split())[:200]})")
    cfg = overlay(today, recorded)
    cfg["paths"] = store["paths"]
    cfg["tracking"] = {**cfg["tracking"], **{k: store["tracking"][k] for k in ("tracking_uri", "artifact_root")}}
    added = sorted(set(today) - set(recorded))
    if added:
        notes.append(f"config groups added since the run take today's defaults: {', '.join(added)}")
    then, now = flat(recorded), flat(today)
    own = ("paths.", "tracking.")  # moved to the new store above
    grown = [k for k in now if k not in then and k.split(".")[0] in recorded and not k.startswith(own)]
    if grown:  # e.g. reward.ema_decay in a run from before it: today's default may train differently
        notes.append(f"settings added since the run take today's defaults: {_first_keys(grown)}")
    changed = [k for k in now if k in then and then[k] != now[k] and not k.startswith(own)]
    if changed:
        notes.append(f"today the run's overrides compose differently at {_first_keys(changed)}: "
                     "the recorded values are used")
    return cfg, notes


def _first_keys(keys: list[str], n: int = 8) -> str:
    """The first `n` dotted keys, comma-separated, with an ellipsis when there are more."""
    return ", ".join(keys[:n]) + (" …" if len(keys) > n else "")


def fresh_root(given: str | None) -> Path:
    """`given` (created; must be new or empty) or a new temporary folder."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix="alignflow-reproduce-"))
    root = Path(given).expanduser().resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ReproduceError(f"--root {root} is not an empty folder: give a new one (a fresh store rebuilds "
                             "every stage)")
    root.mkdir(parents=True, exist_ok=True)
    return root


def reproduce(run_id: str, tracking_uri: str, root: Path, tolerance: float = 0.0,
              original: dict[str, Any] | None = None) -> int:
    """Rerun pipeline run `run_id` of the store at `tracking_uri` (`original`: what `read_run` gave, if read
    already) in a fresh store at `root`; print warnings and the metric comparison; return 1 when an eval/* metric
    differs beyond `tolerance`, else 0."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import alignflow
    from flows.tracking import git_commit, package_versions

    original = original or read_run(tracking_uri, run_id)
    cfg, notes = rebuild_config(original["config"], original["overrides"], root)
    warnings = code_warnings(original["commit"], git_commit()) + package_warnings(original["packages"],
                                                                                   package_versions())
    for line in [*warnings, *notes]:
        print(f"warning: {line}", file=sys.stderr)
    print(f"reproducing run {run_id} ({' '.join(original['overrides']) or 'no overrides'}) in {root}", flush=True)
    summary = alignflow(overrides=original["overrides"], config=cfg)
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    client.set_tag(summary["mlflow_run_id"], "alignflow.reproduces", f"{tracking_uri}#{run_id}")
    rows = compare_metrics(original["metrics"], run_metrics(client, client.get_run(summary["mlflow_run_id"])),
                           tolerance)
    print(format_rows(rows))
    differ = [r["metric"] for r in rows if r["compared"] and r["differs"]]
    evals = [m for m in differ if m.startswith("eval/")]
    compared = sum(r["compared"] for r in rows)
    print(f"{len(differ)} of {compared} metrics differ (tolerance {tolerance:g}), {len(evals)} of them eval/*"
          f"{': ' + ', '.join(evals) if evals else ''}; reproduced run {summary['mlflow_run_id']} in "
          f"{cfg['tracking']['tracking_uri']}")
    return 1 if evals else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="alignflow-reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id", help="the pipeline run's MLflow id")
    parser.add_argument("--from-root", help="the run's ALIGNFLOW_ROOT (default: $ALIGNFLOW_ROOT or .)")
    parser.add_argument("--tracking-uri", help="the run's MLflow store (default: the one under --from-root)")
    parser.add_argument("--root", help="a new or empty folder for the fresh store (default: a temporary one)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="allowed |difference| (default 0: exact)")
    return parser.parse_args(argv)


def _move_state(root: Path) -> None:
    """Prefect's home and the datasets cache go with the fresh store (unless the user set their own)."""
    import flows

    for var, sub in (("PREFECT_HOME", "prefect"), ("HF_DATASETS_CACHE", "hf_datasets")):
        if os.environ.get(var) == str(flows._STATE / sub):  # alignflow's default, derived from the old root
            os.environ[var] = str(root / ".alignflow" / sub)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ["ALIGNFLOW_ROOT"] = str(root)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`alignflow-reproduce`): exit 0 reproduced, 1 an eval/* metric differs, 2 bad input."""
    import logging

    args = _parse(argv)
    source = Path(args.from_root or os.environ.get("ALIGNFLOW_ROOT", ".")).expanduser().resolve()
    uri = args.tracking_uri or f"sqlite:///{source}/mlruns/mlflow.db"
    try:  # bad input fails here, before anything is set up
        original = read_run(uri, args.run_id)
        root = fresh_root(args.root)
    except ReproduceError as err:
        print(f"alignflow-reproduce: {err}", file=sys.stderr)
        return 2
    _move_state(root)  # before Prefect or datasets are imported: they read these settings once
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for name in ("httpx", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from flows import temporary_server
    from flows.config import ConfigError
    from flows.lifecycle import tie_children_to_process

    temporary_server.spawn()  # boots while the run's config is rebuilt and checked
    tie_children_to_process()  # SIGTERM ends runs FAILED; Prefect's temporary server dies with this process
    try:
        return reproduce(args.run_id, uri, root, args.tolerance, original)
    except (ReproduceError, ConfigError) as err:
        print(f"alignflow-reproduce: {err}", file=sys.stderr)
        return 2
    finally:
        temporary_server.cancel()  # one no flow adopted (a check failed)


if __name__ == "__main__":
    sys.exit(main())
