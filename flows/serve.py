"""`alignflow-serve`: Prefect deployments of the pipeline flow on the schedules of a `conf/schedule/` file.

A deployment runs **one** pipeline: the flow `flows.pipeline.alignflow` with its `overrides` parameter fixed. A
`-m` sweep (`hparams_search=…`) is the CLI's, not a flow run's: a scheduled sweep is one deployment per variant
(e.g. three deployments with `rl.kl_coef=0.05|0.1|0.2`), whose shared upstream stages come from the cache.

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # a running `prefect server start` (see the README)
    alignflow-serve nightly                 # conf/schedule/nightly.yaml; serves until Ctrl-C
    alignflow-serve my_schedule.yaml --dry-run

Schedules need a real server: Prefect's temporary server lives as long as one process and runs no scheduler, so
against it `serve` would quietly schedule nothing; alignflow-serve refuses instead (exit status 2). Stopping it
pauses the schedules; starting it again resumes them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from flows.config import CONF_DIR, ConfigError
from flows.prefect_run import answering_api

SCHEDULE_DIR = CONF_DIR / "schedule"
ENTRY_KEYS = {"name", "cron", "interval", "timezone", "overrides", "tags", "description"}
NO_SERVER = ("Cannot schedule flows on an ephemeral server: PREFECT_API_URL is not set. Start a server "
             "(`prefect server start`, see the README) and export PREFECT_API_URL=http://127.0.0.1:4200/api")


class ScheduleError(ValueError):
    """A schedule file or a server that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class Deployment:
    """One served deployment: its name, one schedule (cron or interval), the pipeline's overrides, tags."""

    name: str
    schedule: Any  # prefect.client.schemas.schedules.CronSchedule | IntervalSchedule
    overrides: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    description: str | None = None

    def when(self) -> str:
        """The schedule as a person reads it: `cron 0 2 * * * (UTC)` or `every 3600s`."""
        if hasattr(self.schedule, "cron"):
            return f"cron {self.schedule.cron} ({self.schedule.timezone or 'UTC'})"
        return f"every {self.schedule.interval.total_seconds():g}s"


def schedule_path(source: str) -> Path:
    """`nightly` → conf/schedule/nightly.yaml; a path to a YAML file is used as it is."""
    path = Path(source) if source.endswith((".yaml", ".yml")) else SCHEDULE_DIR / f"{source}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCHEDULE_DIR.glob("*.yaml"))) or "none"
        raise ScheduleError(f"schedule `{source}`: no file {path}; use one of conf/schedule/ ({known}) "
                            "or a path to a .yaml file")
    return path


def _schedule(entry: dict[str, Any], where: str) -> Any:
    """The entry's Prefect schedule, checked by Prefect's own models (cron syntax, IANA time zone)."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from pydantic import ValidationError

    cron, interval, timezone = entry.get("cron"), entry.get("interval"), entry.get("timezone")
    if (cron is None) == (interval is None):
        raise ScheduleError(f"{where}: give exactly one of `cron` (e.g. \"0 2 * * *\") or `interval` (seconds)")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int | float)
                                 or interval <= 0):
        raise ScheduleError(f"{where}.interval = {interval!r} is invalid: use a number of seconds > 0")
    try:
        if cron is not None:
            return CronSchedule(cron=str(cron), timezone=timezone)
        return IntervalSchedule(interval=timedelta(seconds=interval), timezone=timezone)
    except ValidationError as err:
        reason = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise ScheduleError(f"{where}: {reason}") from err


def _strings(entry: dict[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ScheduleError(f"{where}.{key} = {value!r} is invalid: use a list of strings, e.g. "
                            f"{key}: [{'rl.kl_coef=0.1' if key == 'overrides' else 'nightly'}]")
    return list(value)


def parse_deployment(entry: Any, where: str) -> Deployment:
    """One `deployments:` entry of a schedule file, checked field by field."""
    if not isinstance(entry, dict):
        raise ScheduleError(f"{where} is invalid: use a mapping with name, cron or interval, overrides, tags")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise ScheduleError(f"{where}: unknown field(s) {', '.join(unknown)}; use {', '.join(sorted(ENTRY_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/%&<>"):
        raise ScheduleError(f"{where}.name = {name!r} is invalid: use a non-empty name without / % & < >")
    return Deployment(name=name, schedule=_schedule(entry, where), overrides=_strings(entry, "overrides", where),
                      tags=_strings(entry, "tags", where), description=entry.get("description"))


def load_schedule(source: str) -> tuple[list[Deployment], int | None]:
    """The deployments of a schedule file and its `limit` (runs at once); every field checked."""
    from omegaconf import OmegaConf

    path = schedule_path(source)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    entries = raw.get("deployments") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ScheduleError(f"{path}: `deployments` must be a non-empty list of deployments")
    deployments = [parse_deployment(e, f"{path.name}: deployments[{i}]") for i, e in enumerate(entries)]
    names = [d.name for d in deployments]
    if len(set(names)) != len(names):
        raise ScheduleError(f"{path}: deployment names repeat ({', '.join(names)}); give each its own name")
    limit = raw.get("limit", 1)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ScheduleError(f"{path}: limit = {limit!r} is invalid: use a positive integer, or null for no limit")
    return deployments, limit


def check_overrides(deployment: Deployment) -> str:
    """Compose and validate the deployment's pipeline config now, not at 2 a.m.; returns the pipeline's name."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from flows.config import compose_config, validate_config
    from flows.preflight import one_line

    try:
        cfg = compose_config(deployment.overrides)
        validate_config(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        raise ScheduleError(f"deployment `{deployment.name}`: {one_line(err)}") from err
    return cfg["pipeline"]["name"]


def runner_deployments(deployments: list[Deployment], pipelines: list[str]) -> list[Any]:
    """Prefect deployments of the pipeline flow, tagged `alignflow`, the pipeline and the file's tags."""
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import alignflow

    return [alignflow.to_deployment(
        name=d.name, schedules=[d.schedule], parameters={"overrides": d.overrides},
        tags=list(dict.fromkeys(["alignflow", pipeline, *d.tags])),
        description=d.description or f"alignflow {pipeline} {' '.join(d.overrides)}".strip(),
        entrypoint_type=EntrypointType.MODULE_PATH)  # importable wherever alignflow is installed
        for d, pipeline in zip(deployments, pipelines, strict=True)]


def describe(deployments: list[Deployment], pipelines: list[str]) -> str:
    """One line per deployment: `alignflow/<name>`, schedule, pipeline, overrides and tags."""
    return "\n".join(f"alignflow/{d.name}: {d.when()}  pipeline={p}  overrides={d.overrides}  tags={d.tags}"
                     for d, p in zip(deployments, pipelines, strict=True))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `alignflow-serve SCHEDULE [--dry-run] [--limit N]`."""
    parser = argparse.ArgumentParser(prog="alignflow-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("schedule", nargs="?", default="nightly",
                        help="a conf/schedule/ name (default: nightly) or a path to a schedule .yaml file")
    parser.add_argument("--dry-run", action="store_true", help="check and list the deployments, serve nothing")
    parser.add_argument("--limit", type=int, default=None, help="flow runs at once (default: the file's limit)")
    args = parser.parse_args(argv)
    try:
        deployments, limit = load_schedule(args.schedule)
        pipelines = [check_overrides(d) for d in deployments]
        print(describe(deployments, pipelines), flush=True)
        if args.dry_run:
            return
        url = answering_api(ScheduleError, NO_SERVER)
    except ScheduleError as err:
        print(f"alignflow-serve: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    from prefect import serve

    print(f"serving on {url} (Ctrl-C stops and pauses the schedules)", flush=True)
    serve(*runner_deployments(deployments, pipelines), limit=args.limit or limit)


if __name__ == "__main__":
    main()
