"""PPO for language models with a KL penalty to a frozen reference (Ziegler et al. 2019), from scratch.

Each update samples completions from the policy, scores them with a caller-supplied `reward_fn`, turns the
score plus a per-token KL penalty to the reference (the SFT model) into per-token rewards, estimates
advantages with GAE from a value head on the policy's own body, and takes several epochs of clipped-surrogate
steps on shuffled mini-batches. The pure pieces (masked statistics, KL estimates, GAE, losses, KL controllers)
are separate functions so they can be checked against hand-computed values. Every hyperparameter comes from
`PPOSettings`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.generation import (
    Rollout,
    completion_token_stats,
    position_ids_from_mask,
    sample_completions,
    sequence_logprobs,
    with_final_eos,
)
from components.hooks import RewardFn, StepLogger, TokenRewardFn
from components.modeling import load_causal_lm, load_tokenizer, resolve_device

VARIANCE_EPS = 1e-8  # numerical floor in whitening, not a tunable
ADAPTIVE_KL_ERROR_CLIP = 0.2  # Ziegler et al. 2019 clip the proportional error to ±0.2
KL_ESTIMATORS = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------------------------- pure pieces
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1, over everything or along `dim` (empty masks give 0, not NaN)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Variance of `values` where `mask` is 1; `unbiased` applies Bessel's correction n / (n - 1)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.to(values.dtype).sum()
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    """Scale masked `values` to unit variance (and zero mean if `shift_mean`); masked-out entries become 0.

    Whitened advantages keep the policy step size independent of the reward scale.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + VARIANCE_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    "k1": logp - ref_logp (unbiased, can be negative); "k2": (logp - ref_logp)^2 / 2; "k3": r - 1 - log r with
    r = ref_p / p (unbiased and never negative; Schulman's estimators).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens; returns (advantages, returns), 0 where masked.

    Rows are right-padded (mask 0 after EOS), so the value after the last real token is taken as 0: the
    episode ends there. delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: returns (loss, clipfrac, approx_kl); the last two are detached diagnostics.

    loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))) with r = exp(logp - old_logp). clipfrac is the
    share of tokens where the clipped term wins (no gradient flows there); approx_kl is the k3 estimate of
    KL(old || new).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: returns (loss, clipfrac).

    loss = 0.5 * mean(max((V - R)^2, (V_clip - R)^2)) with V_clip = old_V + clip(V - old_V, ±cliprange_value).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > unclipped_err).to(values.dtype), mask)
    return loss, clipfrac.detach()


def apply_missing_eos_penalty(
    scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Subtract `penalty` from the scores of completions that hit the token limit without EOS (None: off)."""
    if penalty is None:
        return scores
    return scores - penalty * (~ended_with_eos).to(scores.dtype)


def build_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every real token, plus the sequence score at the last one."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, coef: float) -> None:
        """Start (and stay) at `coef`."""
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards `target` (Ziegler et al. 2019, eq. 2)."""

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        """Start at `init_coef`; `horizon` (in samples) sets how fast the coefficient can move."""
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """coef *= 1 + clip(KL / target - 1, ±0.2) * n_steps / horizon; `n_steps` = samples in the update."""
        error = min(max(current_kl / self.target - 1.0, -ADAPTIVE_KL_ERROR_CLIP), ADAPTIVE_KL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------------- models
def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, so rollout-time and training-time log-probs agree exactly."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class ValueHeadModel(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state (shared body, dropout off).

    The head is a zero-initialised `nn.Linear(hidden, 1)`, so initial values are 0 and the first updates are
    driven by the rewards alone.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        """Wrap `lm` (modified in place: its dropout is disabled)."""
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, device=lm.device, dtype=lm.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        disable_dropout(self.lm)
        self.can_trim = "logits_to_keep" in inspect.signature(lm.forward).parameters

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, values) for the last `keep` positions, shapes (B, keep, V) and (B, keep); all positions
        when `keep` is 0. Position ids come from the mask (left padding). The LM head skips the positions not kept
        where the model supports it (transformers' `logits_to_keep`)."""
        extra = {"logits_to_keep": keep} if keep and self.can_trim else {}
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=True,
            **extra,
        )
        hidden = out.hidden_states[-1][:, -keep:] if keep else out.hidden_states[-1]
        logits = out.logits[:, -keep:] if keep else out.logits
        return logits, self.values(hidden)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values (B, L) in float32 from last-layer hidden states (B, L, H)."""
        return self.value_head(hidden).squeeze(-1).float()


# -------------------------------------------------------------------------------------------------- training
@dataclass
class PPOSettings:
    """Every PPO knob; no defaults on purpose (the run config fills them all)."""

    total_updates: int  # rollout + optimisation rounds
    batch_size: int  # prompts (= completions) per rollout
    mini_batch_size: int  # completions per optimiser step
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
    missing_eos_penalty: float | None  # subtracted from scores of completions without EOS; None: off
    max_grad_norm: float
    rollout_batch_size: int  # rows per generate / no-grad forward call (memory bound, not a learning knob)
    seed: int
    device: str  # "cpu", "cuda", "cuda:0", … or "auto" (cuda when available)

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
}


@dataclass
class PPOBatch:
    """One rollout turned into training tensors; all (B, T) tensors cover completion tokens only."""

    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    n_prompt: int
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def make_kl_controller(settings: PPOSettings) -> FixedKLController | AdaptiveKLController:
    """The KL controller the settings ask for."""
    if settings.adaptive_kl:
        return AdaptiveKLController(settings.kl_coef, settings.target_kl, settings.kl_horizon)
    return FixedKLController(settings.kl_coef)


def policy_forward(
    policy: ValueHeadModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_prompt: int,
    completion_mask: torch.Tensor,
    temperature: float,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Completion-token (logprobs, values, entropy) from one policy forward; values[t] is V before token t."""
    width = input_ids.shape[1] - n_prompt
    logits, values = policy(input_ids, attention_mask, keep=width + 1)  # the positions that predict completions
    stats = completion_token_stats(
        logits[:, :-1], input_ids[:, n_prompt:], completion_mask, temperature, return_entropy
    )
    return stats.logprobs, values[:, :-1] * completion_mask, stats.entropy


@torch.no_grad()
def _score_rollout(
    policy: ValueHeadModel, ref: PreTrainedModel, rollout: Rollout, settings: PPOSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Old log-probs, old values, reference log-probs and entropies for a rollout, in chunks, without grad.

    The policy's own numbers come from the sampler (`rollout.scores`) when it kept them: the generation steps
    already ran the policy over every completion position, so only the reference needs a forward.
    """
    ids, attn, n_prompt = rollout.input_ids, rollout.attention_mask, rollout.n_prompt
    parts = []
    for start in range(0, ids.shape[0], settings.rollout_batch_size):
        rows = slice(start, start + settings.rollout_batch_size)
        mask = rollout.completion_mask[rows]
        if rollout.scores is None:
            logprobs, values, entropy = policy_forward(
                policy, ids[rows], attn[rows], n_prompt, mask, settings.temperature, True
            )
        else:
            logprobs, entropy = rollout.scores.logprobs[rows], rollout.scores.entropy[rows]
            values = policy.values(rollout.scores.hidden[rows]) * mask
        ref_stats = sequence_logprobs(ref, ids[rows], attn[rows], n_prompt, mask, settings.temperature, False)
        parts.append((logprobs, values, ref_stats.logprobs, entropy))
    logprobs, values, ref_logprobs, entropy = (torch.cat(column) for column in zip(*parts, strict=True))
    return logprobs, values, ref_logprobs, entropy


class PromptSampler:
    """Draws prompt indices in seeded, shuffled passes over the prompt list (no repeats within a pass)."""

    def __init__(self, n_prompts: int, seed: int) -> None:
        """Sample from `range(n_prompts)` with a private generator seeded by `seed`."""
        if n_prompts < 1:
            raise ValueError("need at least one prompt")
        self.n_prompts = n_prompts
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def sample(self, k: int) -> list[int]:
        """The next `k` indices; a new shuffled pass starts when the current one runs out."""
        while len(self.queue) < k:
            self.queue.extend(torch.randperm(self.n_prompts, generator=self.generator).tolist())
        drawn, self.queue = self.queue[:k], self.queue[k:]
        return drawn


def load_policy_and_reference(
    policy_path: str, device: torch.device
) -> tuple[ValueHeadModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Trainable policy with a value head, a frozen reference copy, and the tokenizer, all from `policy_path`.

    Both models load in float32 (a checkpoint saved in half precision would otherwise train in it) and stay in
    eval mode; the policy's dropout is off, so eval mode changes nothing for its gradients.
    """
    tokenizer = load_tokenizer(policy_path)
    policy = ValueHeadModel(load_causal_lm(policy_path, dtype=torch.float32).to(device)).eval()
    ref = load_causal_lm(policy_path, dtype=torch.float32).to(device).eval()
    ref.requires_grad_(False)
    return policy, ref, tokenizer


def _call_reward(
    reward_fn: RewardFn,
    token_reward_fn: TokenRewardFn | None,
    prompts: list[str],
    rollout: Rollout,
    tokenizer: PreTrainedTokenizerBase,
) -> torch.Tensor:
    """Scores as a float tensor, one per completion: from token ids when `token_reward_fn` is given (the reward
    model shares the policy's tokenizer), else from the decoded texts through `reward_fn`."""
    if token_reward_fn is not None:
        scores = token_reward_fn(*with_final_eos(rollout, tokenizer.eos_token_id, tokenizer.pad_token_id))
    else:
        scores = reward_fn(prompts, rollout.texts)
    if len(scores) != len(rollout.texts):
        raise ValueError(f"the reward function returned {len(scores)} scores for {len(rollout.texts)} completions")
    return torch.tensor([float(s) for s in scores], dtype=torch.float32, device=rollout.completion_ids.device)


def _build_batch(
    rollout: Rollout,
    scored: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scores: torch.Tensor,
    kl_coef: float,
    settings: PPOSettings,
) -> tuple[PPOBatch, torch.Tensor]:
    """Per-token rewards, GAE and (optionally) whitened advantages; returns the batch and per-token KL."""
    logprobs, values, ref_logprobs, _ = scored
    mask = rollout.completion_mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs, ref_logprobs, settings.kl_estimator) * mask
    rewards = build_token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = compute_gae(rewards, values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True)
    batch = PPOBatch(
        rollout.input_ids, rollout.attention_mask, rollout.n_prompt, rollout.completion_ids, mask,
        logprobs, values, advantages, returns,
    )  # fmt: skip
    return batch, kl


def _collect(
    policy: ValueHeadModel,
    ref: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    rewards: tuple[RewardFn, TokenRewardFn | None],
    kl_coef: float,
    settings: PPOSettings,
    generation_seed: int,
) -> tuple[PPOBatch, dict[str, float]]:
    """Rollout phase: sample, score with policy/reference/reward, build the training batch and its metrics."""
    started = time.perf_counter()
    rollout = sample_completions(
        policy.lm, tokenizer, prompts, settings.max_new_tokens, settings.temperature,
        settings.rollout_batch_size, generation_seed, keep_scores=True,
    )  # fmt: skip
    generated = time.perf_counter()
    scored = _score_rollout(policy, ref, rollout, settings)
    raw_scores = _call_reward(*rewards, prompts, rollout, tokenizer)
    scored_at = time.perf_counter()
    scores = apply_missing_eos_penalty(raw_scores, rollout.ended_with_eos, settings.missing_eos_penalty)
    batch, kl = _build_batch(rollout, scored, scores, kl_coef, settings)
    stats = torch.stack([
        raw_scores.mean(), scores.mean(), kl.sum(dim=1).mean(), masked_mean(scored[3], batch.completion_mask),
        batch.completion_mask.sum(dim=1).mean(), rollout.ended_with_eos.float().mean(),
    ]).tolist()  # fmt: skip
    keys = ("mean_reward", "mean_score", "kl", "entropy", "mean_length", "eos_rate")
    metrics = {f"ppo/{key}": value for key, value in zip(keys, stats, strict=True)}
    metrics |= {"ppo/kl_coef": float(kl_coef), "ppo/generation_seconds": generated - started,
                "ppo/scoring_seconds": scored_at - generated}
    return batch, metrics


_STEP_KEYS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "value_clipfrac", "grad_norm")


def select_rows(batch: PPOBatch, rows: torch.Tensor) -> PPOBatch:
    """Rows `rows` of `batch`, minus the columns that are padding in every one of them (saves compute).

    Positions come from the attention mask, so dropping all-pad columns changes no row's log-probs.
    """
    attention_mask = batch.attention_mask[rows]
    start = int(attention_mask[:, : batch.n_prompt].any(dim=0).int().argmax())  # first column used by a row
    width = int(batch.completion_mask[rows].sum(dim=1).max())
    columns = slice(start, batch.n_prompt + width)
    return PPOBatch(
        batch.input_ids[rows][:, columns], attention_mask[:, columns], batch.n_prompt - start,
        *(tensor[rows][:, :width] for tensor in (
            batch.completion_ids, batch.completion_mask, batch.old_logprobs, batch.old_values,
            batch.advantages, batch.returns,
        )),
    )  # fmt: skip


def _minibatch_step(
    policy: ValueHeadModel,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    mini: PPOBatch,
    settings: PPOSettings,
) -> torch.Tensor:
    """One clipped PPO step on the mini-batch `mini`; returns its detached diagnostics (see _STEP_KEYS)."""
    mask = mini.completion_mask
    logprobs, values, _ = policy_forward(
        policy, mini.input_ids, mini.attention_mask, mini.n_prompt, mask, settings.temperature, False
    )
    pg_loss, clipfrac, approx_kl = policy_loss(logprobs, mini.old_logprobs, mini.advantages, mask, settings.cliprange)
    vf_loss, vf_clipfrac = value_loss(values, mini.old_values, mini.returns, mask, settings.cliprange_value)
    optimizer.zero_grad(set_to_none=True)
    (pg_loss + settings.vf_coef * vf_loss).backward()
    grad_norm = nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    return torch.stack([pg_loss.detach(), vf_loss.detach(), clipfrac, approx_kl, vf_clipfrac, grad_norm.detach()])


def _optimise(
    policy: ValueHeadModel,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    batch: PPOBatch,
    settings: PPOSettings,
    generator: torch.Generator,
) -> dict[str, float]:
    """`ppo_epochs` passes over the batch in shuffled mini-batches; returns step-averaged diagnostics."""
    n_rows = batch.input_ids.shape[0]
    steps = []
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(n_rows, generator=generator).to(batch.input_ids.device)
        for start in range(0, n_rows, settings.mini_batch_size):
            rows = order[start : start + settings.mini_batch_size]
            steps.append(_minibatch_step(policy, optimizer, params, select_rows(batch, rows), settings))
    means = torch.stack(steps).mean(dim=0).tolist()
    return {f"ppo/{key}": value for key, value in zip(_STEP_KEYS, means, strict=True)}


def save_policy(policy: ValueHeadModel, tokenizer: PreTrainedTokenizerBase, output_dir: str) -> None:
    """Save the language model alone (no value head) and the tokenizer, loadable by AutoModelForCausalLM."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    policy.lm.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def train_ppo(
    policy_path: str,
    prompts: list[str],
    reward_fn: RewardFn,
    settings: PPOSettings,
    output_dir: str,
    on_log: StepLogger | None = None,
    token_reward_fn: TokenRewardFn | None = None,
) -> dict[str, float]:
    """Run PPO from the checkpoint at `policy_path` (also the frozen KL reference) and save the result.

    `reward_fn(prompts, completions)` returns one score per completion; `token_reward_fn`, when given, scores
    the sampled token ids instead (faster; only for a reward model with the policy's tokenizer).
    `on_log(update, metrics)` is called after every update (0-based index) with plain floats. Returns the last
    update's metrics.
    """
    torch.manual_seed(settings.seed)
    device = torch.device(resolve_device(settings.device))
    policy, ref, tokenizer = load_policy_and_reference(policy_path, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate, fused=True)  # one kernel for all tensors
    kl_controller = make_kl_controller(settings)
    sampler = PromptSampler(len(prompts), settings.seed)
    shuffle_generator = torch.Generator().manual_seed(settings.seed + 1)
    metrics: dict[str, float] = {}
    for update in range(settings.total_updates):
        started = time.perf_counter()
        batch_prompts = [prompts[i] for i in sampler.sample(settings.batch_size)]
        generation_seed = settings.seed * 1_000_003 + update
        batch, metrics = _collect(
            policy, ref, tokenizer, batch_prompts, (reward_fn, token_reward_fn), kl_controller.value, settings,
            generation_seed,
        )
        optimising = time.perf_counter()
        metrics |= _optimise(policy, optimizer, params, batch, settings, shuffle_generator)
        metrics["ppo/optimisation_seconds"] = time.perf_counter() - optimising
        kl_controller.update(metrics["ppo/kl"], settings.batch_size)
        metrics["ppo/update_seconds"] = time.perf_counter() - started
        if on_log is not None:
            on_log(update, metrics)
    save_policy(policy, tokenizer, output_dir)
    return metrics
