"""Every config composes, every experiment instantiates, and bad values fail up front naming the field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from trl import RewardConfig, SFTConfig

from components.ppo import PPOSettings
from flows.config import CONF_DIR, ConfigError, compose_config, validate_config
from tests.helpers import cli_env

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml"))  # every option of every group
PRIMARY_GROUPS = {next(iter(d)) for d in OmegaConf.load(CONF_DIR / "config.yaml").defaults if isinstance(d, DictConfig)}
TRL_STAGES = ("sft", "reward", "dpo", "rl")  # nodes whose `args` may be a TRL config (rl: only rloo and grpo)


def _option_overrides(group: str, option: str, tmp_path: Path) -> list[str]:
    """`group=option` (appended with `+` for a group outside the primary defaults list, such as `trainer`), plus
    a placeholder path for every required `???` value the option leaves (e.g. `judge=reward_model`'s path)."""
    overrides = [f"{'' if group in PRIMARY_GROUPS else '+'}{group}={option}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = hydra_compose("config", overrides=overrides)
    return overrides + [f"{key}='{tmp_path / 'required'}'" for key in sorted(OmegaConf.missing_keys(raw))]


def _instantiate_trl_args(cfg: dict, tmp_path: Path) -> dict[str, object]:
    """Every stage's `args` node that names a `_target_`, instantiated as the flow does (output_dir per stage).

    bf16 needs a GPU (or `use_cpu`) to pass transformers' own check, so on a CPU-only machine the GPU profile is
    instantiated with `use_cpu=True`: every field is still checked by the TRL config class."""
    built = {}
    for stage in TRL_STAGES:
        node = cfg[stage].get("args")
        if isinstance(node, dict) and "_target_" in node:
            cpu_only = {"use_cpu": True} if node.get("bf16") and not torch.cuda.is_available() else {}
            built[stage] = instantiate(node, output_dir=str(tmp_path / stage), **cpu_only)
            assert type(built[stage]).__name__ == node["_target_"].rsplit(".", 1)[1]
    return built


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes_validates_and_instantiates(group, option, tmp_path):
    """Each `conf/<group>/<option>.yaml`, found by globbing, composes into the full config, passes validation,
    and every TRL trainer config it yields instantiates (no models: fast)."""
    cfg = compose_config(_option_overrides(group, option, tmp_path))
    validate_config(cfg)
    built = _instantiate_trl_args(cfg, tmp_path)
    expected = {"sft", "reward", "dpo"} | ({"rl"} if cfg["rl"]["algorithm"] in {"rloo", "grpo"} else set())
    assert set(built) == expected


def test_trainer_profile_is_shared_and_switches_every_stage_at_once(tmp_path):
    """The keys every TRL trainer shares live only in conf/trainer/ (no stage file repeats one), reach every
    stage's `args`, and `+trainer=gpu` switches all of them while stage-specific values stay."""
    for path in CONF_DIR.glob("*/*.yaml"):
        own = OmegaConf.load(path).get("args") or {}
        assert not set(own) & set(OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml")), f"{path} repeats them"
    profile = compose_config(["+trainer=cpu"])["trainer"]  # resolved (seed: ${seed})
    gpu_only = {"bf16": True, "dataloader_pin_memory": True}
    for rl in ("rloo", "grpo"):
        cpu, gpu = compose_config([f"rl={rl}"]), compose_config([f"rl={rl}", "+trainer=gpu"])
        assert "trainer" not in cpu  # the default run's config is unchanged: no extra node
        for stage in TRL_STAGES:
            assert cpu[stage]["args"] | profile == cpu[stage]["args"] and profile["bf16"] is False
            assert gpu[stage]["args"] == cpu[stage]["args"] | gpu_only
        assert cpu["rl"]["args"]["logging_steps"] == 5 and cpu["sft"]["args"]["logging_steps"] == 10
    built = _instantiate_trl_args(compose_config(["rl=grpo", "+trainer=gpu"]), tmp_path)
    assert set(built) == set(TRL_STAGES) and all(args.bf16 for args in built.values())


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    """Each experiment composes, validates and builds its trainer configs and PPO settings; only the GPU one turns
    bf16 on (TRL stages and our PPO) and puts our stages on CUDA."""
    cfg = compose_config([f"experiment={experiment}"] if experiment else [])
    validate_config(cfg)
    built = _instantiate_trl_args(cfg, tmp_path)
    sft, reward = built["sft"], built["reward"]
    assert isinstance(sft, SFTConfig) and isinstance(reward, RewardConfig)
    gpu = experiment == "gpu"
    assert sft.bf16 == reward.bf16 == cfg["rl"]["bf16"] == gpu and not sft.gradient_checkpointing
    assert (cfg["device"] == "cuda") == gpu
    assert PPOSettings.from_config(cfg["rl"]).total_updates == cfg["rl"]["total_updates"]


def test_defaults_are_the_embedded_rlhf_pipeline():
    cfg = compose_config([])
    assert cfg["pipeline"]["name"] == "rlhf"
    assert cfg["data"]["source"] == "embedded" and cfg["model"]["name_or_path"] is None
    assert Path(cfg["paths"]["root_dir"]).is_absolute()
    assert cfg["tracking"]["tracking_uri"].startswith("sqlite:///")


def test_real_model_and_data_configs_compose():
    cfg = compose_config(["model=gpt2", "data=ultrafeedback"])
    validate_config(cfg)
    assert cfg["model"]["name_or_path"] == "openai-community/gpt2"
    assert cfg["data"]["preference"]["split"] == "train_prefs"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("rl.cliprange=1.5", "rl.cliprange"),
        ("rl.kl_coef=-0.1", "rl.kl_coef"),
        ("cache.verify=all", "cache.verify"),
        ("label.sampling.temperature=0", "label.sampling.temperature"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens"),
        ("rl.mini_batch_size=7", "rl.mini_batch_size"),
        ("rl.total_updates=0", "rl.total_updates"),
        ("sft.args.learning_rate=0", "sft.args.learning_rate"),
        ("data.embedded.n_sft=0", "data.embedded.n_sft"),
        ("eval.batch_size=abc", "eval.batch_size"),
        ("device=tpu", "device"),
        ("+rl.unknown_knob=1", "rl.unknown_knob"),
        ("reward.conditioning=per_profile", "reward.conditioning"),
        ("reward.conditioning=per_annotator", "reward.conditioning"),  # the default data has no annotator profiles
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(compose_config([override]))


@pytest.mark.parametrize(
    ("overrides", "field", "fix"),
    [
        (["reward.mix={fans:1}"], "reward.mix", r"\['fans'\] label no pairs; use names out of \['concise', 'critic', "),
        (["reward.mix={critic:-1}"], "reward.mix", "weights >= 0, at least one > 0"),
        (["reward.mix={critic:0}"], "reward.mix", "weights >= 0, at least one > 0"),
        (["reward.conditioning=pooled", "reward.mix={critic:1}"], "reward.mix", "reward.conditioning=per_annotator"),
        (["pipeline=rlaif"], "reward.conditioning", "use pipeline=rlhf, or reward.conditioning=pooled"),
        (["data.embedded.annotators.0.share=0"], "data.embedded.annotators.0.share", "number > 0"),
        (["data.embedded.annotators.1.name=con cise"], "data.embedded.annotators.1.name", "letters, digits"),
        (["data.embedded.annotators.2.name=concise"], "data.embedded.annotators.name", "its own name"),
    ],
)
def test_bad_annotator_conditioning_names_the_field_and_the_fix(overrides, field, fix):
    """`reward.conditioning`, `reward.mix` and the data's annotator profiles are checked against each other."""
    base = ["data=embedded_diverse", "reward.conditioning=per_annotator"]
    with pytest.raises(ConfigError, match=rf"`{re.escape(field)}`.*{fix}"):
        validate_config(compose_config(base + overrides))
    validate_config(compose_config([*base, "reward.mix={enthusiast:2,critic:1}"]))  # a profile left out gets 0


def test_cli_rejects_bad_config_before_anything_runs(tmp_path):
    env = {"ALIGNFLOW_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "rl.cliprange=2"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "rl.cliprange" in proc.stdout + proc.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "artifacts").exists()


#: ML libraries that take seconds to import; only the checks and stage bodies that use them may import them.
ML_LIBRARIES = ("torch", "transformers", "trl", "datasets")


def test_cli_flow_preflight_and_stages_import_no_ml_library(tmp_path):
    """`import flows.cli` (and the flow, preflight, the stage registry) loads none of torch, transformers, TRL or
    datasets (5-7 s together): a config error, or a rerun whose stages are all cached, must not pay for them just to
    start; they load where a check or a stage body needs them. Run in a fresh process: this one has them all."""
    code = ("import sys; import flows.cli, flows.config, flows.pipeline, flows.preflight, flows.stages; "
            f"print(*(m for m in {ML_LIBRARIES!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(tmp_path),
                          cwd=Path(__file__).resolve().parents[1], timeout=300)  # this checkout's flows/
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [], (f"importing flows.* imported {proc.stdout.strip()}; find who with "
                                       "`python -X importtime -c 'import flows.cli'` and import it lazily")


def test_num_threads_reaches_torch_without_the_flow_importing_it(tmp_path):
    """`num_threads` sizes torch's pool, but the flow does not import torch for it (a cached rerun would pay its
    import): torch not yet loaded gets the count through OMP_NUM_THREADS at its import; loaded, it is resized."""
    code = ("import sys; from flows.pipeline import use_threads; use_threads(1); assert 'torch' not in sys.modules; "
            "import torch; print(torch.get_num_threads()); use_threads(2); print(torch.get_num_threads())")
    env = {**cli_env(tmp_path), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "2"]


def test_preflight_remembers_a_passed_config_in_the_store(store, monkeypatch):
    """A config that passed preflight is not checked again by a later process on the same store (a cached rerun
    then imports no ML library); another config, or other package versions, are checked again."""
    import flows.preflight as pf

    calls = []
    checked = pf.check_trainer_args
    monkeypatch.setattr(pf, "check_trainer_args", lambda cfg: calls.append(1) or checked(cfg))

    def new_process_preflight(cfg: dict) -> int:
        pf._PASSED.clear()  # what a new process starts with
        before = len(calls)
        pf.preflight(cfg)
        return len(calls) - before

    cfg = compose_config([])
    assert new_process_preflight(cfg) == 1
    assert (store / ".alignflow" / pf.PASSED_FILE).exists()
    assert new_process_preflight(cfg) == 0
    assert new_process_preflight(compose_config(["rl.kl_coef=0.3"])) == 1
    monkeypatch.setattr(pf, "_versions", lambda: {"trl": "0.0.1"})
    assert new_process_preflight(cfg) == 1


@pytest.mark.parametrize("search", sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml")))
def test_hparams_searches_compose_with_sweeper_params(search):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params  # the grid `alignflow -m hparams_search=…` expands
    validate_config(compose_config([f"hparams_search={search}"]))
