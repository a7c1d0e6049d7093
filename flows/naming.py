"""What a pipeline run is called and which params it gets: what differs, readable in MLflow's runs list.

A run's name is its pipeline followed by what makes it different: in a sweep, the swept keys (`rlhf
kl_coef=0.02`); alone, its overrides. Keys are shortened to the shortest dotted suffix that is still unique among
them, and a long name drops whole `key=value` tokens (`… +3 more`), never part of a value. Params are the keys the
run overrides plus a short set of headline knobs; the full config is the run's `config.yaml` artifact.
"""

from __future__ import annotations

from typing import Any

from flows.config import select

MAX_NAME = 250  # MLflow's run-name column
HEADLINE_KNOBS = {  # always logged as params (where the pipeline uses them), so every run lines up on them
    "any": ("pipeline.name", "model.name_or_path", "data.name", "seed"),
    "rl": ("rl.algorithm", "rl.kl_coef", "rl.learning_rate", "rl.total_updates"),
    "dpo": ("dpo.args.beta", "dpo.args.learning_rate"),
    "ai": ("judge.kind",),
}


def split_override(override: str) -> tuple[str, str]:
    """`+rl.kl_coef=0.1` → (`rl.kl_coef`, `0.1`); `~key` → (`key`, ``)."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest suffix that no other key in `keys` ends with (`rl.kl_coef` → `kl_coef`)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


def run_name(pipeline: str, overrides: list[str], swept: list[str] | None = None) -> str:
    """`<pipeline> <what differs>`: the swept keys' values in a sweep (all overrides otherwise), keys shortened."""
    pairs = [split_override(o) for o in overrides if not o.startswith(("hydra.", "~"))]
    if swept:  # a sweep that varies nothing is named like a single run
        order = {k: i for i, k in enumerate(swept)}
        pairs = sorted((p for p in pairs if p[0] in order), key=lambda p: order[p[0]])
    pairs = [(k, v) for k, v in pairs if k != "pipeline"]  # the name starts with it
    short = short_keys([k for k, _ in pairs])
    tokens = [f"{short[k]}={v}" for k, v in pairs]
    name = pipeline
    for i, token in enumerate(tokens):
        rest = f" +{len(tokens) - i} more"
        if len(name) + 1 + len(token) + (len(rest) if i < len(tokens) - 1 else 0) > MAX_NAME:
            return name + rest
        name = f"{name} {token}"
    return name


def run_params(cfg: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """The keys this run overrides (a group override gives the option chosen) plus the headline knobs."""
    kind = cfg.get("pipeline", {})
    knobs = [*HEADLINE_KNOBS["any"], *HEADLINE_KNOBS[kind.get("optimizer", "rl")]]
    if kind.get("feedback") == "ai":
        knobs.extend(HEADLINE_KNOBS["ai"])
    params = {k: str(select(cfg, k)) for k in knobs}
    for override in overrides:
        if override.startswith(("hydra.", "~")):
            continue
        key, value = split_override(override)
        found = select(cfg, key)
        params[key] = value if found is None or isinstance(found, dict) else str(found)
    return {k: v[:6000] for k, v in params.items()}
