"""What a Prefect flow run of the pipeline shows: its name, its tags and the summary artifact.

alignflow's own log lines reach the run's logs through Prefect's API log handler, attached to the `alignflow`
logger by `PREFECT_LOGGING_EXTRA_LOGGERS` (set in `flows/__init__.py`); the terminal still prints each line once.
Everything here is best effort: a Prefect API that cannot be reached costs a warning, never the pipeline.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.runtime import flow_run

from flows import naming

log = logging.getLogger("alignflow")

#: The key under which every pipeline run publishes its summary table (the UI lists its versions across runs).
SUMMARY_KEY = "alignflow-summary"
#: Where `mlflow ui` (README) serves a local store.
MLFLOW_UI = "http://127.0.0.1:5000"


def pipeline_of(parameters: dict[str, Any]) -> str:
    """The pipeline a flow run's parameters select (composed when only overrides are given); `alignflow` when
    they cannot be composed (the flow then reports why)."""
    config = parameters.get("config")
    if isinstance(config, dict):
        return str(config.get("pipeline", {}).get("name", "alignflow"))
    from flows.config import compose_config

    try:
        return str(compose_config(list(parameters.get("overrides") or []))["pipeline"]["name"])
    except Exception:  # noqa: BLE001 - a bad override fails the flow itself, with the real message
        return "alignflow"


def flow_run_name() -> str:
    """The `flow_run_name` of the pipeline flow: the pipeline and its overrides, as its MLflow run is named."""
    parameters = dict(flow_run.parameters or {})
    return naming.run_name(pipeline_of(parameters), list(parameters.get("overrides") or []))


def tag_flow_run(pipeline: str) -> None:
    """Add `alignflow` and the pipeline's name to the current flow run's tags (a deployment's tags stay)."""
    if not flow_run.id:
        return
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run.id).tags or []
            wanted = list(dict.fromkeys([*current, "alignflow", pipeline]))
            if wanted != current:
                client.update_flow_run(flow_run.id, tags=wanted)
    except Exception as err:  # noqa: BLE001 - tags are a convenience
        log.warning("could not tag Prefect flow run %s: %s", flow_run.id, err)


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Markdown pointing at the MLflow run: a real URL for an http(s) tracking server, else the store, the run
    id and the `mlflow ui` command that serves it."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/{path}"
        return f"MLflow run: [{run_id}]({url})"
    return (f"MLflow run `{run_id}` in `{tracking_uri}`: run `mlflow ui --backend-store-uri {tracking_uri}`, "
            f"then open {MLFLOW_UI}/{path}")


def summary_rows(results: list[dict[str, Any]], headline: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per stage: stage, cached, seconds, key and its headline metrics (as in the terminal table)."""
    rows = []
    for r in results:
        shown = {n: r["metrics"][n] for n in headline.get(r["stage"], []) if n in r["metrics"]}
        rows.append({"stage": r["stage"], "cached": "yes" if r["cached"] else "no",
                     "seconds": round(float(r["wall"]), 1), "key": r["key"][:10],
                     "metrics": "  ".join(f"{n}={v:.4g}" for n, v in shown.items())})
    return rows


def publish_summary(results: list[dict[str, Any]], headline: dict[str, list[str]], ok: bool, pipeline: str,
                    tracking: tuple[str, str, str]) -> None:
    """Attach the stage summary and the MLflow link to the current flow run as a table artifact.

    `tracking` is (tracking URI, experiment id, MLflow run id)."""
    if not flow_run.id:
        return
    from prefect.artifacts import create_table_artifact

    outcome = "finished" if ok else "FAILED"
    description = f"**{pipeline}** {outcome}. {mlflow_run_link(*tracking)}"
    try:
        create_table_artifact(summary_rows(results, headline), key=SUMMARY_KEY, description=description)
    except Exception as err:  # noqa: BLE001 - the summary is also in the logs and in MLflow
        log.warning("could not attach the summary to Prefect flow run %s: %s", flow_run.id, err)


def answering_api(error: type[Exception], missing: str) -> str:
    """The configured Prefect API URL once it answers; raises `error` with `missing` when none is configured, or
    with the health check's failure when the server does not answer (callers that need a real server: a temporary
    one has no workers and no schedules)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise error(missing)
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise error(f"the Prefect server at PREFECT_API_URL={url} does not answer ({failure}): start it "
                    "(`prefect server start`, see the README) or fix PREFECT_API_URL")
    return url
