"""PPO for language models with a KL penalty to a frozen reference (Ziegler et al. 2019), from scratch.

Each update samples completions from the policy, scores them with a caller-supplied `reward_fn`, turns the
score plus a per-token KL penalty to the reference (the SFT model) into per-token rewards, estimates
advantages with GAE from a value head on the policy's own body, and takes several epochs of clipped-surrogate
steps on shuffled mini-batches. The pure pieces (masked statistics, KL estimates, GAE, losses, KL controllers)
are separate functions so they can be checked against hand-computed values. Every hyperparameter comes from
`PPOSettings`.

Under `accelerate launch` (WORLD_SIZE > 1) every process runs the same `train_ppo` call as data parallel: all draw
the same global batch of prompt indices and roll out their own slice; advantage whitening, the KL fed to the
controller and the logged metrics are taken over all processes; each mini-batch step sums the processes'
gradients, each weighted by its share of the mini-batch's tokens (the gradient one process would get from the
whole global mini-batch); only the main process saves. `batch_size` and `mini_batch_size` stay global. Outside a
launcher (`Processes()`: one process) every reduction returns its input: the numbers are the one-process ones.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

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
from components.settings import KL_ESTIMATORS, RL_KEYS_READ_ELSEWHERE, PPOSettings  # noqa: F401 - re-exported

VARIANCE_EPS = 1e-8  # numerical floor in whitening, not a tunable
ADAPTIVE_KL_ERROR_CLIP = 0.2  # Ziegler et al. 2019 clip the proportional error to ±0.2
GRAD_BUCKET_NUMEL = 2**25  # gradient elements per all-reduce (128 MiB in float32): bounds the extra memory


# --------------------------------------------------------------------------------------------- data parallel
@dataclass(frozen=True)
class Processes:
    """This process's place among the data-parallel processes of a launched run, and reductions over them.

    The default is one process (rank 0 of 1): every reduction then returns its input untouched, so a run outside
    a launcher computes bit for bit what it computed before data parallelism existed.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and saves."""
        return self.rank == 0

    def split(self, size: int, name: str) -> int:
        """This process's part of a global batch size; refuses one that does not divide (names the field)."""
        if size % self.world_size:
            raise ValueError(f"{name} = {size} is invalid: it is global, split over {self.world_size} processes: "
                             f"use a multiple of {self.world_size}")
        return size // self.world_size

    def shard(self, items: list[int]) -> list[int]:
        """This process's contiguous slice of a list every process holds in full, in the same order."""
        size = self.split(len(items), "the number of items")
        return items[self.rank * size : (self.rank + 1) * size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes, detached (no gradient crosses processes); itself in one process."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone()
        torch.distributed.all_reduce(total)
        return total

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` averaged over the processes; itself in one process."""
        return tensor if self.world_size == 1 else self.sum(tensor) / self.world_size

    def token_share(self, mask: torch.Tensor) -> torch.Tensor | float:
        """This process's fraction of all processes' tokens where `mask` is 1 (exactly 1.0 in one process)."""
        if self.world_size == 1:
            return 1.0
        count = mask.to(torch.float32).sum()
        return count / self.sum(count).clamp(min=1)

    def sum_gradients(self, params: list[nn.Parameter]) -> None:
        """Replace every gradient by its sum over the processes, a bucket of tensors per all-reduce."""
        if self.world_size == 1:
            return
        for param in params:
            if param.grad is None:  # every process must send the same buckets
                param.grad = torch.zeros_like(param)
        for bucket in _buckets([p.grad for p in params], GRAD_BUCKET_NUMEL):
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            torch.distributed.all_reduce(flat)
            for grad, part in zip(bucket, flat.split([grad.numel() for grad in bucket]), strict=True):
                grad.copy_(part.view_as(grad))


def _buckets(tensors: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of `tensors` of at most `limit` elements each (a bigger tensor goes alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and size + tensor.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


ONE_PROCESS = Processes()


def join_processes(device: str) -> tuple[Processes, torch.device]:
    """This process's `Processes` and torch device. Under a launcher (WORLD_SIZE > 1) accelerate's `PartialState`
    joins the process group (gloo on CPU, NCCL on GPUs) and gives each rank its own GPU; else one process on
    `device` ("cpu", "cuda", "auto", …) resolved."""
    resolved = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return ONE_PROCESS, torch.device(resolved)
    from accelerate import PartialState

    state = PartialState(cpu=resolved == "cpu")
    return Processes(state.process_index, state.num_processes), state.device


def generation_seed(seed: int, update: int, rank: int) -> int:
    """The sampling seed of one process's rollout in one update: rank 0 keeps the one-process seed, other ranks
    get streams of their own. Torch's CPU generator keeps only a seed's low 32 bits, so the rank goes in at bit 20:
    no two processes or updates of a run share a stream (up to 4096 processes and 2**20 updates)."""
    return seed * 1_000_003 + update + (rank << 20)


# ----------------------------------------------------------------------------------------------- pure pieces
def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, processes: Processes = ONE_PROCESS
) -> torch.Tensor:
    """Mean of `values` where `mask` is 1, over everything (every process's entries: no gradient then, unless
    one process) or along `dim` (empty masks give 0, not NaN)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return processes.sum((values * mask).sum()) / processes.sum(mask.sum()).clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(
    values: torch.Tensor, mask: torch.Tensor, unbiased: bool, processes: Processes = ONE_PROCESS
) -> torch.Tensor:
    """Variance of `values` where `mask` is 1 (over every process's entries); `unbiased` applies Bessel's
    correction n / (n - 1)."""
    mean = masked_mean(values, mask, processes=processes)
    var = masked_mean((values - mean) ** 2, mask, processes=processes)
    if unbiased:
        count = processes.sum(mask.to(values.dtype).sum())
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool, processes: Processes = ONE_PROCESS
) -> torch.Tensor:
    """Scale masked `values` to unit variance (and zero mean if `shift_mean`); masked-out entries become 0.

    Whitened advantages keep the policy step size independent of the reward scale. The statistics cover every
    process's entries, so a launched run whitens its global batch as one process would.
    """
    mean = masked_mean(values, mask, processes=processes)
    var = masked_var(values, mask, unbiased=True, processes=processes)
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


class RunningMoments:
    """Count, mean and variance of every score seen so far, merged batch by batch (Chan et al.'s parallel update),
    for reward normalisation: scores in units of their running standard deviation give `kl_coef` one meaning
    whatever the reward model's scale."""

    def __init__(self) -> None:
        """Start empty (mean 0, variance 1 until the first batch)."""
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    def update(self, count: float, total: float, total_sq: float) -> None:
        """Merge a batch given by its size, sum and sum of squares (sums over processes add up exactly)."""
        mean = total / count
        var = max(total_sq / count - mean**2, 0.0)
        merged = self.count + count
        delta = mean - self.mean
        m2 = self.var * self.count + var * count + delta**2 * self.count * count / merged
        self.count, self.mean, self.var = merged, self.mean + delta * count / merged, m2 / merged

    def normalise(self, scores: torch.Tensor, processes: Processes = ONE_PROCESS) -> torch.Tensor:
        """Merge `scores` (this process's; all processes' together) into the moments, then return them as
        (score - mean) / std."""
        sums = processes.sum(torch.stack([torch.tensor(float(scores.numel()), device=scores.device),
                                          scores.sum(), (scores**2).sum()])).tolist()
        self.update(*sums)
        return (scores - self.mean) / (self.var + VARIANCE_EPS) ** 0.5


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


def explained_variance(batch: PPOBatch, processes: Processes = ONE_PROCESS) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over completion tokens: how much of the returns the value head
    predicted before this update (1: all, 0: no better than a constant, negative: worse)."""
    mask = batch.completion_mask
    spread = masked_var(batch.returns, mask, False, processes)
    return 1 - masked_var(batch.returns - batch.old_values, mask, False, processes) / spread.clamp(min=1e-8)


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 mixed precision for the forwards on `device` when `bf16` (a no-op otherwise): matrix products run
    in bf16 while weights, Adam's state, log-softmax and the losses stay float32, as in TRL's `bf16=True`."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


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
    already ran the policy over every completion position, so only the reference needs a forward. Under bf16 the
    sampler keeps none: its step-by-step (KV-cache) rounding differs from a whole-sequence forward's, so the old
    log-probs come from the same forward as the training steps', and the first step's ratios are exactly 1.
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
    processes: Processes = ONE_PROCESS,
) -> tuple[PPOBatch, torch.Tensor]:
    """Per-token rewards, GAE and (optionally) advantages whitened over all processes; returns the batch and
    per-token KL."""
    logprobs, values, ref_logprobs, _ = scored
    mask = rollout.completion_mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs, ref_logprobs, settings.kl_estimator) * mask
    rewards = build_token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = compute_gae(rewards, values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True, processes=processes)
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
    seed: int,
    processes: Processes = ONE_PROCESS,
    moments: RunningMoments | None = None,
) -> tuple[PPOBatch, dict[str, float]]:
    """Rollout phase: sample, score with policy/reference/reward, build the training batch and its metrics (over
    all processes: row means average exactly, as every process holds as many rows; entropy is a token mean).
    With `moments` the scores are normalised by their running mean and std before the missing-EOS penalty."""
    started = time.perf_counter()
    with autocast(policy.lm.device, settings.bf16):
        rollout = sample_completions(
            policy.lm, tokenizer, prompts, settings.max_new_tokens, settings.temperature,
            settings.rollout_batch_size, seed, keep_scores=not settings.bf16,
        )  # fmt: skip
        generated = time.perf_counter()
        scored = _score_rollout(policy, ref, rollout, settings)
    raw_scores = _call_reward(*rewards, prompts, rollout, tokenizer)
    scored_at = time.perf_counter()
    scores = raw_scores if moments is None else moments.normalise(raw_scores, processes)
    scores = apply_missing_eos_penalty(scores, rollout.ended_with_eos, settings.missing_eos_penalty)
    batch, kl = _build_batch(rollout, scored, scores, kl_coef, settings, processes)
    stats = processes.mean(torch.stack([
        raw_scores.mean(), scores.mean(), kl.sum(dim=1).mean(),
        masked_mean(scored[3], batch.completion_mask, processes=processes),
        batch.completion_mask.sum(dim=1).mean(), rollout.ended_with_eos.float().mean(),
    ])).tolist()  # fmt: skip
    keys = ("mean_reward", "mean_score", "kl", "entropy", "mean_length", "eos_rate")
    metrics = {f"ppo/{key}": value for key, value in zip(keys, stats, strict=True)}
    metrics["ppo/value_explained_variance"] = float(explained_variance(batch, processes))
    metrics |= {"ppo/kl_coef": float(kl_coef), "ppo/generation_seconds": generated - started,
                "ppo/scoring_seconds": scored_at - generated}
    if moments is not None:
        metrics["ppo/reward_running_std"] = moments.var**0.5
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
    processes: Processes = ONE_PROCESS,
) -> torch.Tensor:
    """One clipped PPO step on this process's part of a mini-batch; returns its detached diagnostics (see
    _STEP_KEYS) weighted by its token share, so that their sum over processes is the global mini-batch's value.

    Each process's loss is a mean over its own tokens; weighted by its share of the global mini-batch's tokens and
    summed over processes, the gradients are those of the token mean over the whole global mini-batch.
    """
    mask = mini.completion_mask
    with autocast(mask.device, settings.bf16):
        logprobs, values, _ = policy_forward(
            policy, mini.input_ids, mini.attention_mask, mini.n_prompt, mask, settings.temperature, False
        )
    pg_loss, clipfrac, approx_kl = policy_loss(logprobs, mini.old_logprobs, mini.advantages, mask, settings.cliprange)
    vf_loss, vf_clipfrac = value_loss(values, mini.old_values, mini.returns, mask, settings.cliprange_value)
    share = processes.token_share(mask)
    optimizer.zero_grad(set_to_none=True)
    ((pg_loss + settings.vf_coef * vf_loss) * share).backward()
    processes.sum_gradients(params)
    grad_norm = nn.utils.clip_grad_norm_(params, settings.max_grad_norm)  # of the summed gradient: same everywhere
    optimizer.step()
    diagnostics = [pg_loss.detach(), vf_loss.detach(), clipfrac, approx_kl, vf_clipfrac, grad_norm.detach()]
    return torch.stack(diagnostics) * share


def _optimise(
    policy: ValueHeadModel,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    batch: PPOBatch,
    settings: PPOSettings,
    generator: torch.Generator,
    processes: Processes = ONE_PROCESS,
) -> dict[str, float]:
    """`ppo_epochs` passes over this process's batch in shuffled mini-batches of `settings.mini_batch_size` rows
    (its part of each global mini-batch); returns step-averaged diagnostics over all processes."""
    n_rows = batch.input_ids.shape[0]
    steps = []
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(n_rows, generator=generator).to(batch.input_ids.device)
        for start in range(0, n_rows, settings.mini_batch_size):
            rows = order[start : start + settings.mini_batch_size]
            steps.append(_minibatch_step(policy, optimizer, params, select_rows(batch, rows), settings, processes))
    means = processes.sum(torch.stack(steps).mean(dim=0)).tolist()
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
    update's metrics. Under `accelerate launch` every process makes this same call (see the module docstring):
    each rolls out its slice of every global batch, and only the main process saves.
    """
    torch.manual_seed(settings.seed)
    processes, device = join_processes(settings.device)
    local = replace(settings, batch_size=processes.split(settings.batch_size, "batch_size"),
                    mini_batch_size=processes.split(settings.mini_batch_size, "mini_batch_size"))
    policy, ref, tokenizer = load_policy_and_reference(policy_path, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate, fused=True)  # one kernel for all tensors
    kl_controller = make_kl_controller(settings)
    moments = RunningMoments() if settings.normalize_reward else None
    sampler = PromptSampler(len(prompts), settings.seed)  # the same global draw in every process
    shuffle_generator = torch.Generator().manual_seed(settings.seed + 1)
    metrics: dict[str, float] = {}
    for update in range(settings.total_updates):
        started = time.perf_counter()
        batch_prompts = [prompts[i] for i in processes.shard(sampler.sample(settings.batch_size))]
        batch, metrics = _collect(
            policy, ref, tokenizer, batch_prompts, (reward_fn, token_reward_fn), kl_controller.value, local,
            generation_seed(settings.seed, update, processes.rank), processes, moments,
        )
        optimising = time.perf_counter()
        metrics |= _optimise(policy, optimizer, params, batch, local, shuffle_generator, processes)
        metrics["ppo/optimisation_seconds"] = time.perf_counter() - optimising
        kl_controller.update(metrics["ppo/kl"], settings.batch_size)
        metrics["ppo/update_seconds"] = time.perf_counter() - started
        if on_log is not None:
            on_log(update, metrics)
    if processes.is_main:
        save_policy(policy, tokenizer, output_dir)
    return metrics
