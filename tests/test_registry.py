"""Models where MLflow users look: checkpoints as LoggedModels, the evaluated policy registered, the champion alias
moved only through the quality gate; dataset inputs that name their real source."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
from datasets import Dataset
from mlflow.tracking import MlflowClient

from components.promotion import champion_gate
from flows.bodies import dataset_source, load_split, prepare_data, register_policy
from flows.models import log_checkpoint
from flows.tracking import init_tracking, stage_run
from tests.helpers import TINY, pipeline_store

NAME = "alignflow-policy"


# ------------------------------------------------------------------------------------------- the gate itself
@pytest.mark.parametrize(("new", "current", "margin", "direction", "promote", "reason"), [
    (0.71, 0.65, 0.02, "higher", True, "0.71 > 0.65 + 0.02"),
    (0.66, 0.65, 0.02, "higher", False, "0.66 <= 0.65 + 0.02"),
    (0.67, 0.65, 0.02, "higher", False, "0.67 <= 0.65 + 0.02"),  # exactly the margin is not enough
    (0.65, 0.65, 0.0, "higher", False, "0.65 <= 0.65 + 0"),
    (0.5, 0.71, 0.02, "lower", True, "0.5 < 0.71 - 0.02"),
    (0.7, 0.71, 0.02, "lower", False, "0.7 >= 0.71 - 0.02"),
    (0.4, None, 0.02, "higher", True, "0.4: no champion value to beat"),
    (None, 0.65, 0.02, "higher", False, "no value to compare (None)"),
    (math.nan, 0.65, 0.02, "higher", False, "no value to compare (nan)"),
])  # fmt: skip
def test_gate_decides_and_says_why(new, current, margin, direction, promote, reason):
    decision = champion_gate(new, current, margin, direction)
    assert (decision.promote, decision.reason) == (promote, reason)
    assert decision.outcome == ("promoted" if promote else "kept")


SPREAD = (2 * 0.027**2) ** 0.5  # two win rates near 0.75 on 256 prompts: ±0.027 each


@pytest.mark.parametrize(("new", "spread", "noise_z", "promote", "reason"), [
    (0.70, SPREAD, 2.0, False, "0.7 <= 0.65 + 0.07637 (2 standard errors; margin 0.02)"),  # beats the margin only
    (0.75, SPREAD, 2.0, True, "0.75 > 0.65 + 0.07637 (2 standard errors; margin 0.02)"),
    (0.70, SPREAD, 0.0, True, "0.7 > 0.65 + 0.02"),  # noise_z 0: the margin alone
    (0.70, 0.005, 2.0, True, "0.7 > 0.65 + 0.02"),  # many prompts: the margin is the larger hurdle
    (0.70, None, 2.0, True, "0.7 > 0.65 + 0.02"),  # a side without a standard error: the margin alone
])  # fmt: skip
def test_gate_needs_the_gain_to_clear_evaluation_noise(new, spread, noise_z, promote, reason):
    decision = champion_gate(new, 0.65, 0.02, "higher", spread=spread, noise_z=noise_z)
    assert (decision.promote, decision.reason) == (promote, reason)
    lower = champion_gate(1 - new, 0.35, 0.02, "lower", spread=spread, noise_z=noise_z)
    assert lower.promote == promote


def test_gate_keeps_the_champion_itself_and_rejects_bad_settings():
    assert champion_gate(0.9, 0.1, 0.0, already_champion=True).reason == "already the champion"
    with pytest.raises(ValueError, match="direction"):
        champion_gate(0.5, 0.4, 0.0, "up")
    with pytest.raises(ValueError, match="margin"):
        champion_gate(0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match="noise_z"):
        champion_gate(0.5, 0.4, 0.0, spread=0.01, noise_z=-1.0)


# ---------------------------------------------------------------------- registration against a real store
def _tracking(root: Path) -> dict:
    return {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "artifact_root": str(root / "mlruns" / "artifacts"),
            "experiment_name": "alignflow", "log_models": True}


def _policy(root: Path, experiment: str, name: str, logged: bool = True) -> dict:
    """A finished policy stage: a checkpoint folder and (if `logged`) its LoggedModel on its producing run."""
    path = root / "artifacts" / "ppo" / name
    (path / "model").mkdir(parents=True)
    (path / "model" / "config.json").write_text(json.dumps({"policy": name}))
    parent = MlflowClient().create_run(experiment).info.run_id
    with stage_run(experiment, parent, "ppo", name, cached=False) as run_id:
        if logged:
            log_checkpoint("ppo", name, path / "model", upload=True)
    return {"stage": "ppo", "key": name, "path": str(path), "mlflow_run_id": run_id, "metrics": {},
            "manifest": {"digest": f"digest-{name}"}}


def _register(root: Path, experiment: str, policy: dict, value: float, stderr: float | None = None,
              **registry) -> tuple[str, dict]:
    """One pipeline run's register stage for `policy` evaluated at `value` (± `stderr`, when given); returns
    (pipeline run, metrics)."""
    pipeline = MlflowClient().create_run(experiment, tags={"alignflow.pipeline": "rlhf"}).info.run_id
    cfg = {"enabled": True, "model_name": NAME, "alias": "champion", "metric": "eval/win_rate_vs_sft",
           "direction": "higher", "margin": 0.02, "noise_z": 2.0, **registry}
    evaluated = {cfg["metric"]: value} | ({cfg["metric"] + "_stderr": stderr} if stderr is not None else {})
    spec = {"config": {"registry": cfg}, "options": {"log_models": True}, "upstream": {
        "policy": policy, "eval": {"stage": "eval", "mlflow_run_id": pipeline, "metrics": evaluated}}}
    stage_dir = root / "artifacts" / "register" / pipeline
    stage_dir.mkdir(parents=True)
    with stage_run(experiment, pipeline, "register", pipeline, cached=False) as run_id:
        metrics = register_policy(spec, stage_dir, run_id)
    return pipeline, metrics


def _verdict(run_id: str) -> tuple[str, str]:
    tags = MlflowClient().get_run(run_id).data.tags
    return tags["alignflow.champion"], tags["alignflow.champion_reason"]


def test_champion_moves_only_through_the_gate_and_registration_is_idempotent(tmp_path):
    experiment = init_tracking(_tracking(tmp_path))
    client = MlflowClient()
    a, b, c = (_policy(tmp_path, experiment, n) for n in "abc")

    run, metrics = _register(tmp_path, experiment, a, 0.65)
    assert metrics == {"register/version": 1.0, "register/promoted": 1.0}
    assert _verdict(run) == ("promoted", "eval/win_rate_vs_sft 0.65: no champion value to beat")

    run, _ = _register(tmp_path, experiment, b, 0.66)  # better, but not by the margin
    assert _verdict(run) == ("kept", "eval/win_rate_vs_sft 0.66 <= 0.65 + 0.02 (champion v1)")
    assert client.get_registered_model(NAME).aliases == {"champion": 1}

    run, metrics = _register(tmp_path, experiment, c, 0.71)
    assert _verdict(run) == ("promoted", "eval/win_rate_vs_sft 0.71 > 0.65 + 0.02 (champion v1)")
    assert client.get_registered_model(NAME).aliases == {"champion": 3}
    version = client.get_model_version(NAME, "3")
    assert version.tags["alignflow.champion"] == "promoted" and version.tags["alignflow.pipeline_run"] == run
    assert version.source.startswith("models:/m-")  # the policy's LoggedModel, downloadable as a checkpoint

    run, metrics = _register(tmp_path, experiment, a, 0.65)  # the same policy again: no second version
    assert metrics["register/version"] == 1.0 and len(client.search_model_versions(f"name = '{NAME}'")) == 3
    assert _verdict(run) == ("kept", "eval/win_rate_vs_sft 0.65 <= 0.71 + 0.02 (champion v3)")

    run, _ = _register(tmp_path, experiment, c, 0.71)
    assert _verdict(run) == ("kept", "eval/win_rate_vs_sft already the champion")

    lower = _policy(tmp_path, experiment, "d")
    run, _ = _register(tmp_path, experiment, lower, 0.5, direction="lower")
    assert _verdict(run) == ("promoted", "eval/win_rate_vs_sft 0.5 < 0.71 - 0.02 (champion v3)")
    assert client.get_registered_model(NAME).aliases == {"champion": 4}


def test_champion_moves_only_for_a_gain_beyond_evaluation_noise(tmp_path):
    experiment = init_tracking(_tracking(tmp_path))
    client = MlflowClient()
    a, b, c = (_policy(tmp_path, experiment, n) for n in "abc")
    _register(tmp_path, experiment, a, 0.65, stderr=0.027)
    assert client.get_model_version(NAME, "1").tags["alignflow.metric_stderr_value"] == "0.027"

    run, _ = _register(tmp_path, experiment, b, 0.70, stderr=0.027)  # +0.05: past the margin, within the noise
    assert _verdict(run) == ("kept", "eval/win_rate_vs_sft 0.7 <= 0.65 + 0.07637 (2 standard errors; margin 0.02) "
                                     "(champion v1)")
    run, _ = _register(tmp_path, experiment, c, 0.75, stderr=0.027)
    assert _verdict(run) == ("promoted", "eval/win_rate_vs_sft 0.75 > 0.65 + 0.07637 (2 standard errors; "
                                         "margin 0.02) (champion v1)")
    assert client.get_registered_model(NAME).aliases == {"champion": 3}


def test_a_policy_without_a_logged_model_is_logged_then_registered(tmp_path):
    """A store that lost the policy's LoggedModel (or runs from before models were logged) still registers it."""
    experiment = init_tracking(_tracking(tmp_path))
    policy = _policy(tmp_path, experiment, "old", logged=False)
    _register(tmp_path, experiment, policy, 0.6)
    version = MlflowClient().get_model_version(NAME, "1")
    model = MlflowClient().get_logged_model(version.source.removeprefix("models:/"))
    assert model.tags["alignflow.checkpoint"] == str(Path(policy["path"]) / "model")
    downloaded = mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "dl"))
    assert json.loads((Path(downloaded) / "config.json").read_text()) == {"policy": "old"}


def test_registration_can_be_switched_off(tmp_path):
    experiment = init_tracking(_tracking(tmp_path))
    _, metrics = _register(tmp_path, experiment, _policy(tmp_path, experiment, "a"), 0.6, enabled=False)
    assert metrics == {"register/enabled": 0.0}
    assert MlflowClient().search_registered_models() == []


# ------------------------------------------------------------------------------------- dataset input sources
def _sources(run_id: str) -> dict[str, tuple[str, dict]]:
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    return {i.dataset.name: (i.dataset.source_type, json.loads(i.dataset.source)) for i in inputs}


def test_a_split_read_from_a_stage_names_its_local_file(tmp_path):
    experiment = init_tracking(_tracking(tmp_path))
    Dataset.from_list([{"prompt": "p", "completion": "c"}]).to_json(str(tmp_path / "sft.jsonl"), lines=True)
    with mlflow.start_run(experiment_id=experiment) as run:
        load_split({"path": str(tmp_path), "stage": "data"}, "sft")
    assert _sources(run.info.run_id) == {"data/sft": ("local", {"uri": str((tmp_path / "sft.jsonl").resolve())})}


def test_user_files_are_local_sources_and_only_hub_ids_point_at_the_hub(tmp_path):
    stage = tmp_path / "stage" / "sft.jsonl"
    hub = dataset_source(stage, {"path": "HuggingFaceH4/ultrafeedback_binarized", "name": None, "split": "train_sft"})
    assert hub._get_source_type() == "hugging_face" and hub.path == "HuggingFaceH4/ultrafeedback_binarized"
    assert hub.split == "train_sft"
    assert dataset_source(stage, {"path": "demos.jsonl"}).to_dict() == {"uri": str(Path("demos.jsonl").resolve())}
    assert dataset_source(stage).to_dict() == {"uri": str(stage.resolve())}

    experiment = init_tracking(_tracking(tmp_path))
    demos, pairs = tmp_path / "demos.jsonl", tmp_path / "pairs.jsonl"
    Dataset.from_list([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]).to_json(str(demos))
    Dataset.from_list([{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
                      ).to_json(str(pairs))
    cfg = {"name": "mine", "source": "files", "sft": {"path": str(demos), "name": None, "split": "train"},
           "preference": {"path": str(pairs), "name": None, "split": "train"}, "preference_eval": None,
           "prompts": None, "eval_fraction": 0.2, "max_samples": None, "seed": 0}
    (tmp_path / "data").mkdir()
    with mlflow.start_run(experiment_id=experiment) as run:
        prepare_data({"config": cfg}, tmp_path / "data", run.info.run_id)
    sources = _sources(run.info.run_id)
    assert sources["mine/sft"] == ("local", {"uri": str(demos)})
    assert {sources[f"mine/{s}"][1]["uri"] for s in ("preference", "preference_eval", "prompts", "eval_prompts")} \
        == {str(pairs)}  # held-out splits and prompts are carved out of the pairs file


# ------------------------------------------------------------------------------------ the stage in the flow
@pytest.fixture(scope="module")
def tiny_store(prefect_harness, tmp_path_factory):
    """One tiny RLHF run into a fresh store."""
    with pipeline_store(tmp_path_factory.mktemp("registry"), TINY) as (root, summary):
        yield root, summary


def test_the_flow_logs_models_registers_the_policy_and_caches_registration(tiny_store, one_thread):
    from flows.pipeline import alignflow

    root, first = tiny_store
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    assert [s["stage"] for s in first["stages"]][-2:] == ["eval", "register"]
    experiment = client.get_experiment_by_name("alignflow").experiment_id
    models = {m.name: m for m in client.search_logged_models([experiment])}
    assert {n: m.model_type for n, m in models.items()} == {"sft": "policy", "reward": "reward_model",
                                                            "ppo": "policy"}
    ppo_run = client.get_run(models["ppo"].source_run_id)
    assert [o.model_id for o in ppo_run.outputs.model_outputs] == [models["ppo"].model_id]
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    champion = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(root / "dl")))
    assert (champion / "model.safetensors").is_file() and (champion / "tokenizer.json").is_file()
    tags = client.get_run(first["mlflow_run_id"]).data.tags
    assert tags["alignflow.champion"] == "promoted" and tags["alignflow.model_version"] == f"{NAME}/1"
    sft_run = next(s["mlflow_run_id"] for s in first["stages"] if s["stage"] == "sft")
    data_dir = Path(next(s["path"] for s in first["stages"] if s["stage"] == "data"))
    assert _sources(sft_run)["embedded/sft"] == ("local", {"uri": str(data_dir / "sft.jsonl")})

    again = alignflow(overrides=TINY)  # the same policy and evaluation: registration is reused, not repeated
    assert next(s for s in again["stages"] if s["stage"] == "register")["cached"]
    stricter = alignflow(overrides=[*TINY, "registry.margin=0.5"])  # a new gate reruns the stage: same version
    register = next(s for s in stricter["stages"] if s["stage"] == "register")
    assert not register["cached"] and register["metrics"]["register/version"] == 1.0
    assert _verdict(stricter["mlflow_run_id"]) == ("kept", "eval/win_rate_vs_sft already the champion")
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1


@pytest.mark.parametrize(("override", "field"), [
    ("registry.direction=up", "registry.direction"), ("registry.margin=-0.1", "registry.margin"),
    ("registry.noise_z=-1", "registry.noise_z"),
    ("registry.alias=latest", "registry.alias"), ("registry.metric=ppo/kl", "registry.metric"),
    ("registry.model_name=''", "registry.model_name"),
])  # fmt: skip
def test_bad_registry_settings_name_the_field(override, field):
    from flows.config import ConfigError, compose_config, validate_config

    with pytest.raises(ConfigError, match=f"config field `{field}`"):
        validate_config(compose_config([override]))
