"""Compose the Hydra config inside a flow and validate it before any stage runs.

The flow's only parameter is the list of Hydra overrides (JSON-serialisable, so a scheduled deployment can pass
the same thing); this module turns it into a plain, resolved dict and checks every value up front, naming the
field and the fix, so bad input fails before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from components.generation import SamplingSettings
from components.ppo import PPOSettings

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
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    plain.pop("hydra", None)
    return plain


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


POSITIVE_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "use a positive integer")
POSITIVE = (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0, "use a number > 0")
NON_NEGATIVE = (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0, "use a number >= 0")
UNIT = (lambda v: isinstance(v, int | float) and 0 <= v <= 1, "use a number in [0, 1]")
OPEN_UNIT = (lambda v: isinstance(v, int | float) and 0 < v < 1, "use a number strictly between 0 and 1")

RULES: dict[str, tuple] = {
    "rl.total_updates": POSITIVE_INT, "rl.batch_size": POSITIVE_INT, "rl.mini_batch_size": POSITIVE_INT,
    "rl.ppo_epochs": POSITIVE_INT, "rl.learning_rate": POSITIVE, "rl.max_new_tokens": POSITIVE_INT,
    "rl.temperature": POSITIVE, "rl.kl_coef": NON_NEGATIVE, "rl.target_kl": POSITIVE, "rl.kl_horizon": POSITIVE,
    "rl.gamma": UNIT, "rl.lam": UNIT, "rl.cliprange": OPEN_UNIT, "rl.cliprange_value": POSITIVE,
    "rl.vf_coef": NON_NEGATIVE, "rl.max_grad_norm": POSITIVE,
}
RULES: dict[str, tuple] = {
    "rl.reward_batch_size": POSITIVE_INT,
    "sft.args.learning_rate": POSITIVE, "sft.args.per_device_train_batch_size": POSITIVE_INT,
    "reward.args.learning_rate": POSITIVE, "reward.args.per_device_train_batch_size": POSITIVE_INT,
    "reward.score_batch_size": POSITIVE_INT,
    "eval.n_table_rows": (lambda v: isinstance(v, int) and v >= 0, "use an integer >= 0"),
}
EMBEDDED_RULES: dict[str, tuple] = {
    f"data.embedded.{k}": POSITIVE_INT
    for k in ("n_sft", "n_preference", "n_eval_preference", "n_prompts", "n_eval_prompts")
} | {"data.embedded.annotator_temperature": POSITIVE}


def validate_config(cfg: dict[str, Any]) -> None:
    """Check the composed config; raise ConfigError naming the first bad field and the fix."""
    _check(cfg, "data.source", lambda v: v in {"embedded", "files"}, "use `embedded` or `files`")
    _check(cfg, "rl.algorithm", lambda v: v in {"ppo", "rloo", "grpo"}, "choose an rl group: rl=ppo|rloo|grpo")
    _check(cfg, "pipeline.feedback", lambda v: v in {"human", "ai"}, "use human or ai")
    _check(cfg, "pipeline.optimizer", lambda v: v in {"rl", "dpo"}, "use rl or dpo")
    _check(cfg, "device", lambda v: v in {"auto", "cpu", "cuda"}, "use auto, cpu or cuda")
    rules = dict(RULES) | (EMBEDDED_RULES if cfg["data"]["source"] == "embedded" else {})
    for dotted, (ok, fix) in rules.items():
        _check(cfg, dotted, ok, fix)
    if cfg["model"].get("name_or_path") is None and not cfg["model"].get("init"):
        raise ConfigError("config field `model.name_or_path` is null and `model.init` is empty: set one of them")
    _settings("rl", PPOSettings, cfg["rl"]) if cfg["rl"]["algorithm"] == "ppo" else None
    _settings("eval", SamplingSettings, cfg["eval"])
    _settings("revision", SamplingSettings, cfg["revision"])


def _settings(group: str, cls: type, node: dict[str, Any]) -> Any:
    """Build a component's settings from its config node; its own checks become a ConfigError naming the field."""
    try:
        return cls.from_config(node)
    except KeyError as err:
        raise ConfigError(f"config field `{group}.{err.args[0]}` is missing: add it") from err
    except ValueError as err:  # settings name the field first: "<field> = <value> is invalid: <fix>"
        field, _, rest = str(err).partition(" ")
        raise ConfigError(f"config field `{group}.{field}` {rest}") from err
