"""Settings dataclasses that check configs, free of torch: the CLI validates a config before importing ML libraries.

`flows.config.validate_config` builds each of them from its config node, so a bad value fails in well under a
second, naming the field and the fix, before torch, transformers or TRL are imported: a config error, or a rerun
whose stages are all cached, does not pay seconds of imports for nothing. The components they configure re-export
them (`components.generation.SamplingSettings`, `components.ppo.PPOSettings`, `components.reward.RewardConditioning`),
so those imports keep working; code that needs only the settings imports them from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

KL_ESTIMATORS = ("k1", "k2", "k3")
CONDITIONINGS = ("pooled", "per_annotator")


# ------------------------------------------------------------------------------- sampling (components.generation)
@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled (evaluation, pair sampling for judges, CAI revisions); checks itself."""

    max_new_tokens: int  # completion budget in tokens
    temperature: float  # softmax temperature; plain sampling otherwise (top_k 0, top_p 1)
    batch_size: int  # prompts per generate call (memory and speed, not results)
    seed: int  # sampling seed: the same seed gives the same completions

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} = {value!r} is invalid: use a positive integer")
        if not isinstance(self.temperature, int | float) or isinstance(self.temperature, bool) \
                or self.temperature <= 0:
            raise ValueError(f"temperature = {self.temperature!r} is invalid: use a number > 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed = {self.seed!r} is invalid: use an integer")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SamplingSettings:
        """The settings from a config node holding (at least) these four keys."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})


# ------------------------------------------------------------------------------------------ PPO (components.ppo)
@dataclass
class PPOSettings:
    """Every PPO knob; no defaults on purpose (the run config fills them all)."""

    total_updates: int  # rollout + optimisation rounds
    batch_size: int  # prompts (= completions) per rollout, over all processes when launched
    mini_batch_size: int  # completions per optimiser step, over all processes when launched
    ppo_epochs: int  # passes over each rollout
    learning_rate: float  # Adam, shared by policy and value head
    max_new_tokens: int
    temperature: float  # sampling temperature; log-probs use the same scaling
    kl_coef: float  # initial (or fixed) coefficient of the per-token KL penalty
    adaptive_kl: bool  # adapt kl_coef towards target_kl
    target_kl: float  # target summed KL per sequence (adaptive only)
    kl_horizon: int  # adaptive controller horizon, in samples
    kl_estimator: str  # "k1", "k2" or "k3" for the per-token KL in the reward
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    whiten_advantages: bool
    normalize_reward: bool  # scores minus their running mean, over their running std (before the EOS penalty)
    missing_eos_penalty: float | None  # subtracted from scores of completions without EOS; None: off
    max_grad_norm: float
    rollout_batch_size: int  # rows per generate / no-grad forward call (memory bound, not a learning knob)
    seed: int
    device: str  # "cpu", "cuda", "cuda:0", … or "auto" (cuda when available)
    bf16: bool  # forwards in bfloat16 autocast (weights, optimiser and losses stay float32)

    def __post_init__(self) -> None:
        """Reject values that would fail late, in the middle of a run; the message names the field and the fix."""
        for name, (ok, fix) in _PPO_CHECKS.items():
            value = getattr(self, name)
            if not _holds(ok, value):
                raise ValueError(f"{name} = {value!r} is invalid: {fix}")
        if self.mini_batch_size > self.batch_size or self.batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size = {self.mini_batch_size} is invalid: it must divide batch_size "
                             f"= {self.batch_size}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PPOSettings:
        """Settings from the `rl` config node: every field must be there; keys alignflow reads itself are skipped."""
        known = {f.name for f in fields(cls)}
        for name in sorted(known - set(cfg)):
            raise ValueError(f"{name} is missing: add it to the rl config")
        for name in sorted(set(cfg) - known - RL_KEYS_READ_ELSEWHERE):
            raise ValueError(f"{name} is unknown to PPO: remove it or fix its spelling")
        return cls(**{name: cfg[name] for name in known})


def _holds(ok: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(ok(value))
    except TypeError:
        return False


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


RL_KEYS_READ_ELSEWHERE = {"algorithm", "reward_batch_size"}  # the rl node's keys the flow reads, not PPO
_POSITIVE = (lambda v: _number(v) and v > 0, "use a number > 0")
_COUNT = (_count, "use a positive integer")
_PPO_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "total_updates": _COUNT, "batch_size": _COUNT, "mini_batch_size": _COUNT, "ppo_epochs": _COUNT,
    "rollout_batch_size": _COUNT, "max_new_tokens": _COUNT, "kl_horizon": _POSITIVE,
    "learning_rate": _POSITIVE, "temperature": _POSITIVE, "target_kl": _POSITIVE, "cliprange_value": _POSITIVE,
    "max_grad_norm": _POSITIVE,
    "kl_coef": (lambda v: _number(v) and v >= 0, "use a number >= 0"),
    "vf_coef": (lambda v: _number(v) and v >= 0, "use a number >= 0"),
    "gamma": (lambda v: _number(v) and 0 <= v <= 1, "use a number in [0, 1]"),
    "lam": (lambda v: _number(v) and 0 <= v <= 1, "use a number in [0, 1]"),
    "cliprange": (lambda v: _number(v) and 0 < v < 1, "use a number strictly between 0 and 1"),
    "kl_estimator": (lambda v: v in KL_ESTIMATORS, f"use one of {', '.join(KL_ESTIMATORS)}"),
    "missing_eos_penalty": (lambda v: v is None or _number(v), "use a number or null"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "use an integer"),
    "adaptive_kl": (lambda v: isinstance(v, bool), "use true or false"),
    "whiten_advantages": (lambda v: isinstance(v, bool), "use true or false"),
    "bf16": (lambda v: isinstance(v, bool), "use true or false"),
    "normalize_reward": (lambda v: isinstance(v, bool), "use true or false"),
}


# ------------------------------------------------------------------------------------ reward (components.reward)
@dataclass(frozen=True)
class RewardConditioning:
    """Whom the reward model listens to: one `pooled` scalar for every annotator, or `per_annotator` (one head per
    profile). `mix` weights the heads into the scalar reward RL and evaluation use (profile -> weight >= 0; a profile
    left out gets 0; null: equal weights), so a sweep over it shows how serving one group costs another."""

    conditioning: str = "pooled"
    mix: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        """Refuse an unknown conditioning, negative or all-zero weights, and a mix for a pooled model."""
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning = {self.conditioning!r} is invalid: use one of {', '.join(CONDITIONINGS)}")
        if self.mix is None:
            return
        numbers = isinstance(self.mix, Mapping) and all(
            isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in self.mix.values())
        if not numbers or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix = {self.mix!r} is invalid: map profile names to weights >= 0, at least one > 0, "
                             "e.g. reward.mix={enthusiast:2,concise:1,critic:1}, or null for equal weights")
        if self.conditioning == "pooled":
            raise ValueError(f"mix = {dict(self.mix)!r} is invalid: it weights the heads of a per-annotator model; set "
                             "reward.conditioning=per_annotator, or reward.mix=null")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RewardConditioning:
        """The settings from the `reward` node (an older config without these keys: pooled)."""
        return cls(cfg.get("conditioning", "pooled"), cfg.get("mix"))

    def weights(self, heads: Sequence[str]) -> list[float]:
        """The mix as one weight per head (in `heads`' order), summing to 1; names outside `heads` are refused."""
        unknown = sorted(set(self.mix or {}) - set(heads))
        if unknown:
            raise ValueError(f"mix = {dict(self.mix or {})!r} is invalid: {unknown} label no pairs; use names out of "
                             f"{list(heads)}")
        raw = [float((self.mix or dict.fromkeys(heads, 1.0)).get(h, 0.0)) for h in heads]
        return [w / sum(raw) for w in raw]
