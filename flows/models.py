"""MLflow models: every trained checkpoint as an MLflow 3 LoggedModel, the evaluated policy as a registered version.

Why a LoggedModel record rather than `mlflow.transformers.log_model`: the flavour loads the checkpoint and writes
it out again (a second copy of every weight, gigabytes for a real model, plus a pipeline task per model kind),
while the stage directory already holds a `from_pretrained` checkpoint. So a stage's checkpoint becomes the
LoggedModel's artifacts as they are (`tracking.log_models=true`: one upload, `models:/<id>` downloads the
folder), or an external LoggedModel whose tag `alignflow.checkpoint` points at the stage directory (no copy).

The register stage (`flows.bodies.register_policy`) registers the evaluated policy's LoggedModel as a version of
`registry.model_name` (once per policy: a version is found again by the policy's content digest) and moves the
alias `registry.alias` only through the quality gate of `components.promotion`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.promotion import GateDecision, champion_gate
from components.stats import STDERR, difference_stderr

log = logging.getLogger("alignflow")
LOADERS = {"reward": "AutoModelForSequenceClassification"}  # every other checkpoint is a causal LM (a policy)


def log_checkpoint(stage: str, key: str, model_dir: Path, upload: bool) -> str:
    """Log a stage's checkpoint as a LoggedModel of the active run: uploaded as it is, or an external record
    pointing at the folder. Returns the model id."""
    loader = LOADERS.get(stage, "AutoModelForCausalLM")
    tags = {"alignflow.stage": stage, "alignflow.key": key, "alignflow.checkpoint": str(Path(model_dir).resolve()),
            "alignflow.load": f"transformers.{loader}.from_pretrained(<model folder>)"}
    kind = "reward_model" if stage in LOADERS else "policy"
    if upload:
        model = mlflow.initialize_logged_model(name=stage, model_type=kind, tags=tags)
        try:
            MlflowClient().log_model_artifacts(model.model_id, str(model_dir))
        except BaseException:
            mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    else:
        model = mlflow.create_external_model(name=stage, model_type=kind, tags=tags)
    mlflow.log_outputs([LoggedModelOutput(model.model_id, step=0)])  # listed on the run page, as log_model does
    return model.model_id


def stage_model(result: dict[str, Any], experiment_id: str, upload: bool) -> str:
    """The LoggedModel of a finished stage (its producing run's), logged now if this store lacks it."""
    found = MlflowClient().search_logged_models([experiment_id],
                                                filter_string=f"source_run_id = '{result['mlflow_run_id']}'")
    ready = [m for m in found if m.tags.get("alignflow.stage") == result["stage"]
             and m.status == LoggedModelStatus.READY]
    if ready:
        return ready[0].model_id
    return log_checkpoint(result["stage"], result["key"], Path(result["path"]) / "model", upload)


def champion(name: str, alias: str) -> ModelVersion | None:
    """The version of registered model `name` holding `alias`, or None (no champion yet)."""
    client = MlflowClient()
    version = client.get_registered_model(name).aliases.get(alias)
    return client.get_model_version(name, version) if version is not None else None


def version_value(version: ModelVersion, metric: str) -> float | None:
    """A version's value of `metric`: the one recorded at registration, else its evaluation's (eval stage run,
    then pipeline run: the gate metric may have changed since), else None."""
    for suffix in ("", STDERR):  # the gate metric's value and standard error, as recorded at registration
        recorded = version.tags.get(f"alignflow.metric{suffix}_value")
        if version.tags.get("alignflow.metric", "") + suffix == metric and recorded is not None:
            return float(recorded)
    for tag in ("alignflow.eval_run", "alignflow.pipeline_run"):
        try:
            metrics = MlflowClient().get_run(version.tags[tag]).data.metrics
        except (KeyError, MlflowException):
            continue
        if metric in metrics:
            return metrics[metric]
    return None


def find_or_register(name: str, model_id: str, digest: str, tags: dict[str, str]) -> ModelVersion:
    """The version of `name` registered for the policy with content `digest`, registered now if there is none
    (registering the same policy again is a no-op); its tags are updated either way."""
    client = MlflowClient()
    found = client.search_model_versions(f"name = '{name}' and tags.`alignflow.policy_digest` = '{digest}'")
    if found:
        version = min(found, key=lambda v: int(v.version))
        log.info("[register] policy %s is already version %s of %s", digest[:10], version.version, name)
    else:
        version = mlflow.register_model(f"models:/{model_id}", name, await_registration_for=0,
                                        tags={"alignflow.policy_digest": digest})
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return client.get_model_version(name, version.version)


def gate(registry: dict[str, Any], version: ModelVersion, value: float | None,
         stderr: float | None = None) -> tuple[GateDecision, str]:
    """Apply the quality gate to `version` (scoring `value`, ± `stderr` over the held-out prompts) against the
    current champion; move the alias if it passes. Returns the decision and the full reason (metric, comparison,
    champion version)."""
    current = champion(registry["model_name"], registry["alias"])
    same = current is not None and current.version == version.version
    theirs = version_value(current, registry["metric"]) if current is not None and not same else None
    their_stderr = version_value(current, registry["metric"] + STDERR) if current is not None and not same else None
    spread = None if stderr is None or their_stderr is None else difference_stderr(stderr, their_stderr)
    decision = champion_gate(value, theirs, registry["margin"], registry["direction"], already_champion=same,
                             spread=spread, noise_z=registry.get("noise_z", 0.0))
    reason = f"{registry['metric']} {decision.reason}"
    if current is not None and not same:
        reason += f" (champion v{current.version})"
    if decision.promote:
        MlflowClient().set_registered_model_alias(registry["model_name"], registry["alias"], version.version)
    return decision, reason


def record_verdict(name: str, version: str, outcome: str, reason: str, run_ids: list[str]) -> None:
    """Tag the gate's verdict (`alignflow.champion` = promoted|kept, `alignflow.champion_reason`) on the model
    version and on the given runs (the register stage run and its pipeline run)."""
    client = MlflowClient()
    verdict = {"alignflow.champion": outcome, "alignflow.champion_reason": reason}
    for key, value in verdict.items():
        client.set_model_version_tag(name, version, key, value)
    for run_id in run_ids:
        for key, value in {**verdict, "alignflow.model_version": f"{name}/{version}"}.items():
            client.set_tag(run_id, key, value)
    log.info("[register] %s version %s: %s (%s)", name, version, outcome, reason)
