"""Compose the Hydra config inside a flow and validate it before any stage runs.

The flow's only parameter is the list of Hydra overrides (JSON-serialisable, so a scheduled deployment can pass
the same thing); this module turns it into a plain, resolved dict and checks every value up front, naming the
field and the fix, so bad input fails before training starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from components.feedback import FeedbackSettings
from components.promotion import DIRECTIONS
from components.rankings import RankingSettings
from components.settings import PPOSettings, RewardConditioning, SamplingSettings  # torch-free, unlike their components
from flows.launch import LAUNCHED_STAGES, launched

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()), replace=True)

class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and how to fix it."""


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """Compose `conf/config.yaml` with `overrides` and return it resolved as a plain dict (no `hydra` node)."""
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main: reuse its search path
        cfg = compose(config_name="config", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    return to_plain(cfg)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """A composed config as a resolved plain dict without the `hydra` node (what the flow and stages read)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"config field `{err.full_key}` is required (???): set it, e.g. {err.full_key}=…") from err
    except OmegaConfBaseException as err:  # an interpolation that cannot be resolved
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(f"config field `{err.full_key}` cannot be resolved: {reason}") from err
    plain.pop("hydra", None)
    return plain


def select(cfg: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted path of a plain config (`data.sft.path`), or None where the path does not exist."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _check(cfg: dict[str, Any], dotted: str, ok, fix: str) -> None:
    try:
        value = _get(cfg, dotted)
    except (KeyError, TypeError) as err:
        raise ConfigError(f"config field `{dotted}` is missing: {fix}") from err
    try:
        valid = ok(value)
    except TypeError:
        valid = False
    if not valid:
        raise ConfigError(f"config field `{dotted}` = {value!r} is invalid: {fix}")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE_INT = (lambda v: _integer(v) and v > 0, "use a positive integer")
POSITIVE = (lambda v: _number(v) and v > 0, "use a number > 0")
PATH = (lambda v: isinstance(v, str) and v.strip() != "", "set it to a .jsonl/.json/.parquet/.csv file, a "
        "save_to_disk folder or a hub dataset id")

#: Checked first: every other group reads them (`${seed}`, `${device}`).
GLOBAL_RULES: dict[str, tuple] = {
    "seed": (lambda v: _integer(v) and v >= 0, "use a non-negative integer, e.g. seed=0"),
    "num_threads": (lambda v: v is None or (_integer(v) and v > 0),
                    "use a positive integer, or null for torch's default"),
    "device": (lambda v: v in {"auto", "cpu", "cuda"}, "use auto, cpu or cuda"),
    "data.source": (lambda v: v in {"embedded", "files"}, "use `embedded` or `files`"),
    "rl.algorithm": (lambda v: v in {"ppo", "rloo", "grpo"}, "choose an rl group: rl=ppo|rloo|grpo"),
    "pipeline.feedback": (lambda v: v in {"human", "ai"}, "use human or ai"),
    "pipeline.optimizer": (lambda v: v in {"rl", "dpo"}, "use rl or dpo"),
    "cache.verify": (lambda v: v in {"sizes", "hashes", "none"}, "use sizes, hashes or none"),
    "model.name_or_path": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""),
                           "give a hub id or a local checkpoint directory, or null to build `model.init`"),
}
RULES: dict[str, tuple] = {
    "rl.reward_batch_size": POSITIVE_INT,
    "reward.score_batch_size": POSITIVE_INT,
    "reward.length_buckets": POSITIVE_INT,
    "reward.ema_decay": (lambda v: v is None or (_number(v) and 0 < v < 1),
                         "use a number in (0, 1), e.g. 0.98, or null to keep the last step's weights"),
    "eval.n_table_rows": (lambda v: _integer(v) and v >= 0, "use an integer >= 0"),
    "registry.enabled": (lambda v: isinstance(v, bool), "use true or false"),
    "registry.model_name": (lambda v: isinstance(v, str) and v.strip() != "", "name the registered model"),
    "registry.alias": (lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w-]*", v) is not None
                       and re.fullmatch(r"v\d+|latest", v) is None, "use a word such as champion (not latest, v1)"),
    "registry.metric": (lambda v: isinstance(v, str) and v.startswith("eval/"), "use an eval metric, e.g. "
                        "eval/win_rate_vs_sft"),
    "registry.direction": (lambda v: v in DIRECTIONS, "use higher or lower (which way is better)"),
    "registry.margin": (lambda v: _number(v) and v >= 0, "use a number >= 0"),
    "registry.noise_z": (lambda v: _number(v) and v >= 0, "use a number >= 0 (0: the margin alone decides)"),
}
EMBEDDED_RULES: dict[str, tuple] = {
    f"data.embedded.{k}": POSITIVE_INT
    for k in ("n_sft", "n_preference", "n_eval_preference", "n_prompts", "n_eval_prompts")
} | {"data.embedded.annotator_temperature": POSITIVE}
FILES_RULES: dict[str, tuple] = {
    "data.sft.path": PATH,
    "data.preference.path": PATH,
    "data.max_samples": (lambda v: v is None or (_integer(v) and v > 0),
                         "use a positive number of rows per split, or null for all rows"),
    "data.eval_fraction": (lambda v: (isinstance(v, float) and 0 < v < 1) or (_integer(v) and v > 0),
                           "use a fraction in (0, 1) or a row count >= 1"),
}

#: Sequences shorter than this leave no room for a prompt and an answer (TRL truncates silently).
MIN_LENGTH = 16
#: Checks of every TRL stage's `args` for values TRL and transformers accept silently; `ok(value, args)`.
#: A key the node does not set keeps TRL's default and is not checked.
TRAINER_RULES: dict[str, tuple] = {
    "learning_rate": (lambda v, a: _number(v) and v > 0, "use a number > 0"),
    "per_device_train_batch_size": (lambda v, a: _integer(v) and v >= 1, "use a positive integer"),
    "gradient_accumulation_steps": (lambda v, a: _integer(v) and v >= 1, "use a positive integer"),
    "num_train_epochs": (lambda v, a: (_number(v) and v > 0) or (_integer(a.get("max_steps")) and a["max_steps"] > 0),
                         "use a number > 0, or set max_steps > 0 (0 epochs trains nothing)"),
    "max_steps": (lambda v, a: _integer(v) and (v > 0 or v == -1),
                  "use a positive number of steps, or -1 to train for num_train_epochs"),
    "max_length": (lambda v, a: v is None or (_integer(v) and v >= MIN_LENGTH),
                   f"use at least {MIN_LENGTH} tokens: the prompt and the answer must both fit"),
    "max_completion_length": (lambda v, a: _integer(v) and v >= 1, "use a positive integer"),
}
STAGE_RULES: dict[str, dict[str, tuple]] = {
    "dpo": {"beta": (lambda v, a: _number(v) and v > 0,
                     "use a number > 0 (0 turns the KL to the reference off)")},
    "rl": {"beta": (lambda v, a: _number(v) and v >= 0, "use a number >= 0 (0: no KL to the SFT model)"),
           "num_generations": (lambda v, a: _integer(v) and v >= 2,
                               "use at least 2 samples per prompt (advantages compare a prompt's samples)")},
}

#: `conf/feedback/human_loop.yaml`, checked when `feedback.loop` is on.
FEEDBACK_RULES: dict[str, tuple] = {
    "feedback.source": (lambda v: v in {"sft", "policy"}, "use sft, or policy (samples from feedback.policy_path)"),
    "feedback.wait.mode": (lambda v: v in {"pause", "poll"},
                           "use pause (the flow run waits to be resumed) or poll (checks Label Studio)"),
    "feedback.wait.min_labelled": (lambda v: _number(v) and 0 < v <= 1, "use a share of the round in (0, 1]"),
    "feedback.wait.poll_seconds": POSITIVE_INT,
    "feedback.wait.timeout_hours": POSITIVE,
    "feedback.score_batch_size": POSITIVE_INT,
    "feedback.label_studio.url": (lambda v: isinstance(v, str) and v.startswith(("http://", "https://")),
                                  "use the server's address, e.g. http://127.0.0.1:8080"),
    "feedback.label_studio.api_key_env": (lambda v: isinstance(v, str) and v.strip() != "",
                                          "name the environment variable holding the API token"),
    "feedback.label_studio.project": (lambda v: isinstance(v, str) and v.strip() != "", "give a project title"),
}


#: The stages `peft=lora` can train (TRL trainers; our PPO trains every weight).
LORA_STAGES = ("sft", "reward", "dpo")
#: `conf/accelerate/` and `conf/peft/` (checked when the config has those groups; older recorded runs do not).
ACCELERATE_RULES: dict[str, tuple] = {
    "accelerate.num_processes": POSITIVE_INT,
    "accelerate.config": (lambda v: v is None or isinstance(v, dict),
                          "use a mapping (the keys of an accelerate config file), or null to train in-process"),
}
LORA_RULES: dict[str, tuple] = {
    "peft.r": POSITIVE_INT,
    "peft.lora_alpha": POSITIVE,
    "peft.lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "use a probability in [0, 1)"),
    "peft.target_modules": (lambda v: (isinstance(v, str) and v.strip() != "") or (
        isinstance(v, list) and v != [] and all(isinstance(m, str) for m in v)),
        "use all-linear or a list of module names, e.g. [c_attn, c_proj, c_fc] for GPT-2"),
    "peft.stages": (lambda v: isinstance(v, list) and set(v) <= set(LORA_STAGES),
                    f"use a list out of {list(LORA_STAGES)}"),
}


def trainer_stages(cfg: dict[str, Any]) -> list[str]:
    """The config nodes whose `args` this pipeline hands to a TRL trainer (sft, reward|dpo, rl for rloo/grpo)."""
    if cfg["pipeline"]["optimizer"] == "dpo":
        return ["sft", "dpo"]
    return ["sft", "reward"] + (["rl"] if cfg["rl"]["algorithm"] in {"rloo", "grpo"} else [])


def _check_trainer_args(cfg: dict[str, Any], stage: str) -> None:
    args = cfg[stage].get("args")
    if not isinstance(args, dict):
        raise ConfigError(f"config field `{stage}.args` is missing: add the TRL config node (see conf/{stage}/)")
    for key, (ok, fix) in (TRAINER_RULES | STAGE_RULES.get(stage, {})).items():
        if key in args:
            _check(cfg, f"{stage}.args.{key}", lambda v, ok=ok: ok(v, args), fix)


def validate_config(cfg: dict[str, Any]) -> None:
    """Check the composed config's values (no files, models or machine: see flows.preflight); raise ConfigError
    naming the first bad field and the fix."""
    for dotted, (ok, fix) in GLOBAL_RULES.items():
        _check(cfg, dotted, ok, fix)
    source = EMBEDDED_RULES if cfg["data"]["source"] == "embedded" else FILES_RULES
    optional = [f"data.{k}.path" for k in ("preference_eval", "prompts") if cfg["data"].get(k) is not None]
    for dotted, (ok, fix) in (RULES | source | dict.fromkeys(optional, PATH)).items():
        _check(cfg, dotted, ok, fix)
    if cfg["model"].get("name_or_path") is None and not cfg["model"].get("init"):
        raise ConfigError("config field `model.name_or_path` is null and `model.init` is empty: set one of them")
    for stage in trainer_stages(cfg):
        _check_trainer_args(cfg, stage)
    _check_scaling(cfg)
    if cfg["rl"]["algorithm"] == "ppo" and cfg["pipeline"]["optimizer"] == "rl":
        _settings("rl", PPOSettings, cfg["rl"])
    if cfg["data"]["source"] == "files" and "rankings" in cfg["data"]:
        _settings("data.rankings", RankingSettings, cfg["data"]["rankings"])
    _settings("eval", SamplingSettings, cfg["eval"])
    _settings("revision", SamplingSettings, cfg["revision"])
    _settings("label.sampling", SamplingSettings, cfg["label"]["sampling"])
    _check_conditioning(cfg)
    _check_feedback(cfg)


def _check_feedback(cfg: dict[str, Any]) -> None:
    """`feedback=human_loop`: people rank what the SFT model (or a policy) says; not with an AI judge labelling."""
    feedback = cfg.get("feedback") or {}
    if not feedback.get("loop"):
        return
    if cfg["pipeline"]["feedback"] == "ai":
        raise ConfigError(f"config field `feedback` = human_loop asks people to rank, but pipeline="
                          f"{cfg['pipeline']['name']} has the AI judge label: use pipeline=rlhf or pipeline=dpo "
                          "with feedback=human_loop, or feedback=none")
    for dotted, (ok, fix) in FEEDBACK_RULES.items():
        _check(cfg, dotted, ok, fix)
    if feedback["source"] == "policy":
        _check(cfg, "feedback.policy_path", lambda v: isinstance(v, str) and v.strip() != "",
               "give the checkpoint to sample from (source=policy), e.g. the last round's PPO model folder")
    _settings("feedback", FeedbackSettings, feedback)
    _settings("feedback.rankings", RankingSettings, feedback["rankings"])
    _settings("feedback.sampling", SamplingSettings, feedback["sampling"])


def _annotator_profiles(cfg: dict[str, Any]) -> list[str]:
    """The names of `data.embedded.annotators` (each node checked, naming its field), or [] without profiles."""
    from components.annotators import profiles_from_config

    embedded = cfg["data"].get("embedded") if cfg["data"]["source"] == "embedded" else None
    nodes = (embedded or {}).get("annotators") or []
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "name" in n for n in nodes):
        raise ConfigError(f"config field `data.embedded.annotators` = {nodes!r:.80} is invalid: give a list of profile "
                          "nodes, each with a name (see conf/data/embedded_diverse.yaml)")
    for i, node in enumerate(nodes):
        share = node.get("share", 1.0)
        if not (_number(share) and share > 0):
            raise ConfigError(f"config field `data.embedded.annotators.{i}.share` = {share!r} is invalid: use a "
                              "number > 0 (its relative share of the pairs)")
        _named(f"data.embedded.annotators.{i}", lambda node=node: profiles_from_config([node]))
    _named("data.embedded.annotators", lambda: profiles_from_config(nodes))
    return [node["name"] for node in nodes]


def _named(group: str, check: Any) -> Any:
    """Run a component's own check; its ValueError ("<field> = <value> is invalid: <fix>") becomes a ConfigError
    naming `<group>.<field>`."""
    try:
        return check()
    except ValueError as err:
        field, _, rest = str(err).partition(" ")
        raise ConfigError(f"config field `{group}.{field}` {rest}") from err
    except TypeError as err:  # a value of the wrong kind, e.g. weights that are not a mapping
        raise ConfigError(f"config field `{group}` is invalid: {err}; see conf/data/embedded_diverse.yaml") from err


def _check_conditioning(cfg: dict[str, Any]) -> None:
    """`reward.conditioning` and `reward.mix`, against the annotators the data has (embedded profiles; other data
    is checked when the reward stage reads its pairs)."""
    settings = _settings("reward", RewardConditioning, cfg["reward"])
    names = _annotator_profiles(cfg)
    if settings.conditioning == "pooled" or cfg["pipeline"]["optimizer"] != "rl":
        return
    if cfg["pipeline"]["feedback"] == "ai":
        raise ConfigError(f"config field `reward.conditioning` = 'per_annotator' needs pairs labelled by annotators, "
                          f"but pipeline={cfg['pipeline']['name']} has the AI judge label them: use pipeline=rlhf, "
                          "or reward.conditioning=pooled")
    human_loop = (cfg.get("feedback") or {}).get("loop", False)  # Label Studio's users are the annotators
    if cfg["data"]["source"] == "embedded" and not names and not human_loop:
        raise ConfigError("config field `reward.conditioning` = 'per_annotator' needs annotator profiles: use "
                          "data=embedded_diverse (or set data.embedded.annotators), or reward.conditioning=pooled")
    if names:
        _named("reward", lambda: settings.weights(sorted(names)))


def _check_scaling(cfg: dict[str, Any]) -> None:
    """The `accelerate` and `peft` groups; a launched stage's batch must split evenly over its processes (the
    per-process batch is per_device_train_batch_size / num_processes, PPO's rl.batch_size and rl.mini_batch_size
    / num_processes, so the global batch stays as configured)."""
    if "peft" in cfg:
        _check(cfg, "peft.method", lambda v: v in {"none", "lora"}, "use peft=none or peft=lora")
        for dotted, (ok, fix) in (LORA_RULES if cfg["peft"]["method"] == "lora" else {}).items():
            _check(cfg, dotted, ok, fix)
    if "accelerate" not in cfg:
        return
    for dotted, (ok, fix) in ACCELERATE_RULES.items():
        _check(cfg, dotted, ok, fix)
    n = cfg["accelerate"]["num_processes"]
    if not launched(cfg["accelerate"]):
        _check(cfg, "accelerate.num_processes", lambda v: v == 1, "accelerate=none trains in this one process; "
               "choose an option that launches, e.g. accelerate=cpu_ddp (CPU) or accelerate=ddp (GPUs)")
        return
    split = [(f"{s}.args.per_device_train_batch_size", "batch") for s in trainer_stages(cfg) if s in LAUNCHED_STAGES]
    if cfg["pipeline"]["optimizer"] == "rl" and cfg["rl"]["algorithm"] == "ppo":
        split += [("rl.batch_size", "batch"), ("rl.mini_batch_size", "mini-batch")]
    for dotted, what in split:
        _check(cfg, dotted, lambda v, n=n: v % n == 0,
               f"under accelerate it is the global {what}, split over accelerate.num_processes={n} processes: "
               f"use a multiple of {n} (e.g. {dotted}={_multiple(select(cfg, dotted), n)}), "
               "or another accelerate.num_processes")


def _multiple(value: Any, n: int) -> int:
    """The nearest multiple of `n` at or above `value` (n itself when value is not a number)."""
    return n * max(1, -(-value // n)) if _integer(value) else n


def _settings(group: str, cls: type, node: dict[str, Any]) -> Any:
    """Build a component's settings from its config node; its own checks become a ConfigError naming the field."""
    try:
        return cls.from_config(node)
    except KeyError as err:
        raise ConfigError(f"config field `{group}.{err.args[0]}` is missing: add it") from err
    except ValueError as err:  # settings name the field first: "<field> = <value> is invalid: <fix>"
        field, _, rest = str(err).partition(" ")
        raise ConfigError(f"config field `{group}.{field}` {rest}") from err
