"""PPO pieces against hand-computed values, plus a short seeded run that must learn a toy reward.

Also the stand-ins tests/test_accelerate.py launches PPO with (`toy_reward`, `train_ppo_row_seeded`): they live
here, where imports are light, because every launched process imports them.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from components import ppo
from components.generation import Rollout, TokenScores, sample_completions
from components.hooks import RewardFn
from components.modeling import load_causal_lm, load_tokenizer
from components.ppo import (
    ONE_PROCESS,
    AdaptiveKLController,
    FixedKLController,
    PPOBatch,
    PPOSettings,
    Processes,
    PromptSampler,
    RunningMoments,
    ValueHeadModel,
    _buckets,
    apply_missing_eos_penalty,
    build_token_rewards,
    compute_gae,
    explained_variance,
    generation_seed,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_forward,
    policy_loss,
    select_rows,
    train_ppo,
    value_loss,
)
from tests.helpers import synthetic_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(**overrides) -> PPOSettings:
    """Small, fast settings for the tests (the real values come from conf/rl/ppo.yaml)."""
    values = dict(
        total_updates=16, batch_size=32, mini_batch_size=16, ppo_epochs=2, learning_rate=3e-3,
        max_new_tokens=12, temperature=1.0, kl_coef=0.01, adaptive_kl=False, target_kl=1.0, kl_horizon=1000,
        kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        whiten_advantages=True, normalize_reward=False, missing_eos_penalty=None, max_grad_norm=1.0,
        rollout_batch_size=32, seed=0, device="cpu", bf16=False,
    )  # fmt: skip
    values.update(overrides)
    return PPOSettings(**values)


# ------------------------------------------------------------------------------------------ masked statistics
def test_masked_mean_and_var_ignore_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    rows = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    assert masked_mean(rows, torch.tensor([[1, 1], [1, 0]]), dim=1).tolist() == [2.0, 5.0]


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=True), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


# -------------------------------------------------------------------------------------------------------- KL
def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # r - 1 - log r, r=.5
    assert kl_estimate(ref, logp, "k3").item() >= 0  # k3 is never negative, unlike k1
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_adaptive_kl_controller_moves_towards_target():
    high = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    high.update(current_kl=12.0, n_steps=64)  # error 1.0, clipped to 0.2
    assert high.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 1000))
    low = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    low.update(current_kl=5.4, n_steps=64)  # error -0.1, inside the clip
    assert low.value == pytest.approx(0.1 * (1 - 0.1 * 64 / 1000))
    on_target = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    on_target.update(current_kl=6.0, n_steps=64)
    assert on_target.value == pytest.approx(0.1)
    fixed = FixedKLController(0.2)
    fixed.update(current_kl=100.0, n_steps=64)
    assert fixed.value == 0.2


# ------------------------------------------------------------------------------------------- rewards and GAE
def test_running_moments_match_every_score_seen_and_ignore_the_reward_scale():
    first, second = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([10.0, -4.0])
    moments = RunningMoments()
    torch.testing.assert_close(moments.normalise(first), (first - 3.0) / first.var(unbiased=False).sqrt())
    moments.normalise(second)
    seen = torch.cat([first, second])
    assert moments.count == 6
    assert moments.mean == pytest.approx(seen.mean().item())
    assert moments.var == pytest.approx(seen.var(unbiased=False).item())
    scaled = RunningMoments()  # a reward model 10x as large gives the same normalised rewards
    scaled.normalise(first * 10)
    torch.testing.assert_close(scaled.normalise(second * 10), RunningMoments().normalise(seen)[-2:], rtol=1e-5,
                               atol=1e-6)


def test_running_moments_bound_the_first_difference_after_constant_scores():
    moments = RunningMoments()  # a reward that was constant so far: the running variance is 0
    moments.normalise(torch.full((62,), 5.0))
    assert moments.var == 0.0
    # the batch is merged before it is normalised, so its own spread is in the variance: |z| <= sqrt(count) = 8
    # here (7.94), where dividing by the variance seen before it (0, so sqrt(1e-8)) would give z = 1e4
    first_difference = moments.normalise(torch.tensor([5.0, 6.0]))
    assert torch.isfinite(first_difference).all()
    assert first_difference.abs().max() <= moments.count**0.5
    assert first_difference[1] > first_difference[0]


def test_token_rewards_and_missing_eos_penalty():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = build_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 1.0 - 0.15], [-0.25, 2.0 - 0.2, 0.0]]))
    scores, ended = torch.tensor([1.0, 2.0]), torch.tensor([True, False])
    assert apply_missing_eos_penalty(scores, ended, 1.5).tolist() == [1.0, 0.5]
    assert apply_missing_eos_penalty(scores, ended, None).tolist() == [1.0, 2.0]


def test_gae_by_hand_with_masking_after_eos():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.1, 1.0, 5.0]])  # row 2 ended at t=1: t=2 entries are junk
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: d2 = 1 - .3 = .7; d1 = -.2 + .9*.3 - .4 = -.33; d0 = .1 + .9*.4 - .5 = -.04; gamma*lam = .72
    #        A2 = .7, A1 = -.33 + .72*.7 = .174, A0 = -.04 + .72*.174 = .08528
    # row 2: d1 = 1 - .4 = .6 (episode ends: no bootstrap from t=2), A0 = -.04 + .72*.6 = .392
    torch.testing.assert_close(advantages, torch.tensor([[0.08528, 0.174, 0.7], [0.392, 0.6, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.58528, 0.574, 1.0], [0.892, 1.0, 0.0]]))


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, -0.1, 2.0]])
    values = torch.tensor([[0.3, 0.2, 0.1]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[1.9, 1.9, 2.0]]))
    torch.testing.assert_close(advantages, returns - values)


# ---------------------------------------------------------------------------------------------------- losses
def test_policy_loss_clipping_and_gradients():
    # tokens: (A=+1, r=1.5) clipped; (A=+1, r=1.1) inside; (A=-1, r=0.5) clipped; (A=-1, r=1.6) not clipped
    # (pessimistic bound keeps the unclipped term); the 5th token is masked out and must not matter.
    ratios = torch.tensor([[1.5, 1.1, 0.5, 1.6, 50.0]])
    logprobs = ratios.log().clone().requires_grad_(True)
    old = torch.zeros(1, 5)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clipfrac, approx_kl = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8 + 1.6) / 4, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 1.1, 0.5, 1.6)) / 4
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)
    loss.backward()
    # d(-A r)/d logp = -A r, averaged over 4 tokens; clipped tokens get exactly zero gradient
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1.1 / 4, 0.0, 1.6 / 4, 0.0]]))


def test_value_loss_clipping():
    values = torch.tensor([[0.5, 0.1, -0.5, 7.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    returns = torch.ones(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # 0.5 -> clipped 0.2: (0.2-1)^2=.64 > (0.5-1)^2=.25, clipped wins; 0.1 inside: .81; -0.5: 2.25 > 1.44
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    # d(0.5 * err^2 / 3)/dV = (V - R) / 3 where the unclipped term wins, 0 where the clipped one does
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, (0.1 - 1) / 3, (-0.5 - 1) / 3, 0.0]]))


def test_explained_variance_by_hand():
    """Returns 1, 2, 3 (variance 2/3) on the unmasked tokens; the 100 sits under the mask."""

    def batch(values: list[float]) -> PPOBatch:
        mask, zeros = torch.tensor([[1, 1, 1, 0]]), torch.zeros(1, 4)
        returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
        return PPOBatch(zeros.long(), mask, 0, zeros.long(), mask, zeros, torch.tensor([values]), zeros, returns)

    assert explained_variance(batch([1.0, 2.0, 3.0, 0.0])).item() == pytest.approx(1.0)  # perfect
    assert explained_variance(batch([7.0, 7.0, 7.0, 0.0])).item() == pytest.approx(0.0)  # a constant
    # residuals 0, 0, 1 (variance 2/9): 1 - (2/9) / (2/3) = 2/3
    assert explained_variance(batch([1.0, 2.0, 2.0, 0.0])).item() == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------ models and bookkeeping
def test_value_head_starts_at_zero_and_keeps_lm_logits(tiny_checkpoint):
    lm = load_causal_lm(tiny_checkpoint)
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    policy = ValueHeadModel(lm).train()
    assert all(m.p == 0.0 for m in lm.modules() if isinstance(m, torch.nn.Dropout))
    logits, values = policy(ids, mask)
    assert values.shape == (2, 4) and (values == 0).all()
    again, _ = policy(ids, mask)
    torch.testing.assert_close(logits, again)  # dropout off: train mode is deterministic
    assert not any(name.startswith("value_head") for name in lm.state_dict())


def test_select_rows_trims_shared_padding_without_changing_logprobs(tiny_checkpoint):
    policy = ValueHeadModel(load_causal_lm(tiny_checkpoint)).eval()
    prompts = ["the cat", "a", "the big red dog ran under a small blue log", "very good"]
    out = sample_completions(policy.lm, load_tokenizer(tiny_checkpoint), prompts, 6, 1.0, 4, generator_seed=0)
    mask = out.completion_mask.float()
    with torch.no_grad():
        logprobs, values, _ = policy_forward(policy, out.input_ids, out.attention_mask, out.n_prompt, mask, 1.0, False)
    extra = torch.arange(mask.numel(), dtype=torch.float32).view_as(mask)
    batch = PPOBatch(
        out.input_ids, out.attention_mask, out.n_prompt, out.completion_ids, mask, logprobs, values, extra, -extra
    )
    rows = torch.tensor([3, 1])  # the two short prompts: the long prompt's padding columns go
    mini = select_rows(batch, rows)
    assert mini.input_ids.shape[1] < out.input_ids.shape[1] and mini.n_prompt < out.n_prompt
    width = int(mask[rows].sum(dim=1).max())
    assert mini.completion_ids.shape[1] == width
    torch.testing.assert_close(mini.advantages, extra[rows][:, :width])
    torch.testing.assert_close(mini.returns, -extra[rows][:, :width])
    with torch.no_grad():
        again, again_values, _ = policy_forward(
            policy, mini.input_ids, mini.attention_mask, mini.n_prompt, mini.completion_mask, 1.0, False
        )
    torch.testing.assert_close(again, mini.old_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again_values, mini.old_values)


def test_sampler_scores_match_a_policy_forward_over_the_rollout(tiny_checkpoint):
    """The log-probs, entropies and values PPO takes from the generation steps are what a full forward computes."""
    policy = ValueHeadModel(load_causal_lm(tiny_checkpoint)).eval()
    torch.nn.init.normal_(policy.value_head.weight)  # non-zero values, so the check means something
    prompts = ["the cat", "a", "the big red dog ran under a small blue log", "very good", "x y"]
    out = sample_completions(policy.lm, load_tokenizer(tiny_checkpoint), prompts, 7, 0.7, 3, 0, keep_scores=True)
    mask = out.completion_mask.float()
    with torch.no_grad():
        logprobs, values, entropy = policy_forward(
            policy, out.input_ids, out.attention_mask, out.n_prompt, mask, 0.7, True
        )
        sampled_values = policy.values(out.scores.hidden) * mask
    torch.testing.assert_close(out.scores.logprobs, logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.scores.entropy, entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sampled_values, values, atol=1e-4, rtol=1e-4)
    assert (out.scores.logprobs[mask == 0] == 0).all()


def test_value_head_model_keeps_only_the_last_positions(tiny_checkpoint):
    policy = ValueHeadModel(load_causal_lm(tiny_checkpoint)).eval()
    ids, mask = torch.tensor([[0, 5, 6, 7, 9], [8, 9, 10, 11, 12]]), torch.tensor([[0, 1, 1, 1, 1], [1] * 5])
    with torch.no_grad():
        logits, values = policy(ids, mask)
        kept, kept_values = policy(ids, mask, keep=3)
    assert policy.can_trim and kept.shape == (2, 3, logits.shape[-1])
    torch.testing.assert_close(kept, logits[:, -3:])
    torch.testing.assert_close(kept_values, values[:, -3:])


def test_prompt_sampler_covers_every_prompt_each_pass():
    sampler = PromptSampler(5, seed=0)
    assert sorted(sampler.sample(5)) == [0, 1, 2, 3, 4]
    assert sorted(sampler.sample(3) + sampler.sample(2)) == [0, 1, 2, 3, 4]
    assert PromptSampler(5, seed=0).sample(5) == PromptSampler(5, seed=0).sample(5)


def test_settings_reject_unknown_kl_estimator():
    with pytest.raises(ValueError):
        settings(kl_estimator="k9")
    with pytest.raises(ValueError):
        settings(mini_batch_size=64)


# ------------------------------------------------------------------------------------------------ learning
REQUIRED_KEYS = {
    "ppo/mean_reward", "ppo/kl", "ppo/entropy", "ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac",
    "ppo/approx_kl", "ppo/kl_coef", "ppo/mean_length", "ppo/eos_rate", "ppo/update_seconds",
    "ppo/value_explained_variance",
}  # fmt: skip


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_train_ppo_learns_a_toy_reward_and_saves_a_loadable_lm(tiny_checkpoint, tmp_path, bf16):
    """+1 per occurrence of "the" in the completion: the random tiny model says it ~0.3 times per 12 tokens;
    after 16 updates ~11 (seeds 0-5 all gave 0.2-0.4 -> 11-11.4), so the +3 margin is far from flaky. The same
    in bf16 autocast (CPU autocast here; the saved weights stay float32)."""
    torch.manual_seed(0)
    logged: list[tuple[int, dict[str, float]]] = []

    def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
        assert len(prompts) == len(completions) == 32
        return [float(c.count("the")) for c in completions]

    out_dir = str(tmp_path / "ppo")
    final = train_ppo(
        tiny_checkpoint, synthetic_corpus(64, 1), reward_fn,
        settings(adaptive_kl=True, missing_eos_penalty=0.0, bf16=bf16), out_dir, lambda i, m: logged.append((i, m)),
    )  # fmt: skip
    assert [i for i, _ in logged] == list(range(16))
    assert REQUIRED_KEYS <= set(final) and final == logged[-1][1]
    assert all(isinstance(v, float) and math.isfinite(v) for _, m in logged for v in m.values())
    rewards = [m["ppo/mean_reward"] for _, m in logged]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 3.0, rewards
    assert logged[-1][1]["ppo/kl"] > 0 and logged[-1][1]["ppo/kl_coef"] != logged[0][1]["ppo/kl_coef"]
    reloaded = load_causal_lm(out_dir)
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}


def test_bf16_runs_the_matrix_products_in_bfloat16_and_returns_float32(tiny_checkpoint):
    """`autocast(device, True)`: the LM head's output is bfloat16, while the weights and the log-probs and values
    PPO's losses use stay float32; `autocast(device, False)` changes nothing."""
    policy = ValueHeadModel(load_causal_lm(tiny_checkpoint)).eval()
    seen: list[torch.dtype] = []
    policy.lm.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for bf16 in (True, False):
        with ppo.autocast(ids.device, bf16):
            logprobs, values, _ = policy_forward(policy, ids, torch.ones_like(ids), 2, torch.ones(1, 3), 1.0, False)
        assert logprobs.dtype == values.dtype == torch.float32 and logprobs.shape == values.shape == (1, 3)
    assert seen == [torch.bfloat16, torch.float32]
    assert {p.dtype for p in policy.parameters()} == {torch.float32}


def test_bf16_old_logprobs_come_from_the_training_forward(tiny_checkpoint, tmp_path):
    """Under bf16 the first optimiser step sees ratios of exactly 1: the old log-probs come from a whole-sequence
    forward like the step's own, not from the sampler's KV-cache steps (whose bf16 rounding differs: measured
    approx_kl 9e-8 with them, 0.0 without). One step on the whole batch, so no update precedes it."""
    logged: list[dict[str, float]] = []
    train_ppo(tiny_checkpoint, synthetic_corpus(64, 1), toy_reward(),
              settings(bf16=True, total_updates=1, ppo_epochs=1, mini_batch_size=32), str(tmp_path / "out"),
              lambda i, m: logged.append(m))  # fmt: skip
    assert logged[0]["ppo/approx_kl"] == 0.0 and logged[0]["ppo/clipfrac"] == 0.0


def test_normalised_rewards_make_ppo_blind_to_the_reward_models_scale_and_offset(tiny_checkpoint, tmp_path):
    """With normalize_reward the policy learns the same from a reward and from 100x it plus 5 (what two reward
    models trained to different scales give); without it, the scale changes what is learned."""

    def trained(scale: float, normalize: bool) -> dict[str, torch.Tensor]:
        def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
            return [scale * c.count("the") + 5.0 * (scale != 1) for c in completions]

        out = tmp_path / f"{scale}-{normalize}"
        logged: list[dict[str, float]] = []
        train_ppo(tiny_checkpoint, synthetic_corpus(64, 1), reward_fn,
                  settings(total_updates=2, normalize_reward=normalize), str(out), lambda i, m: logged.append(m))
        assert ("ppo/reward_running_std" in logged[-1]) == normalize
        return load_causal_lm(str(out)).state_dict()

    def largest_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max((a[n] - b[n]).abs().max().item() for n in a)

    plain, scaled, unnormalised = trained(1.0, True), trained(100.0, True), trained(100.0, False)
    assert largest_change(plain, scaled) < 1e-3  # float rounding, amplified where Adam's gradients are near 0
    assert largest_change(plain, unnormalised) > 1e-2  # measured: 1e-4 against 4e-2


def test_a_global_batch_that_does_not_split_is_refused_naming_the_field():
    assert Processes(1, 4).split(64, "batch_size") == 16
    with pytest.raises(ValueError, match=r"^mini_batch_size = 30 is invalid: it is global, split over 4 processes: "
                                         r"use a multiple of 4$"):
        Processes(1, 4).split(30, "mini_batch_size")


# ------------------------------------------------------------------------------- data parallel (one process)
def test_every_process_takes_its_slice_of_the_same_global_draw():
    """Each process draws the same global indices from the same seed and keeps its contiguous slice: the slices
    of all processes, in rank order, are the one-process draw, update after update."""
    samplers = [PromptSampler(10, seed=3) for _ in range(3)]
    for _ in range(4):  # passes wrap around: 6 of 10 per draw
        draws = [sampler.sample(6) for sampler in samplers]
        assert draws[0] == draws[1] == draws[2]
        slices = [Processes(rank, 3).shard(draws[rank]) for rank in range(3)]
        assert [len(part) for part in slices] == [2, 2, 2] and sum(slices, []) == draws[0]
    assert Processes().shard([4, 1, 2]) == [4, 1, 2]
    with pytest.raises(ValueError, match="split over 2 processes"):
        Processes(0, 2).shard([1, 2, 3])


def test_one_process_reductions_return_their_input():
    """Outside a launcher every reduction is the identity (the same object), so the numbers are the old ones."""
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    assert ONE_PROCESS.sum(x) is x and ONE_PROCESS.mean(x) is x and ONE_PROCESS.token_share(mask) == 1.0
    assert ONE_PROCESS == Processes(0, 1) and ONE_PROCESS.is_main and not Processes(1, 2).is_main
    assert masked_mean(x, mask, processes=ONE_PROCESS).item() == pytest.approx(2.0)
    assert masked_var(x, mask, unbiased=True, processes=ONE_PROCESS).item() == pytest.approx(1.0)
    torch.testing.assert_close(masked_whiten(x, mask, True, ONE_PROCESS), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    ONE_PROCESS.sum_gradients([param])
    assert param.grad.tolist() == [2.0, 2.0, 2.0]


def test_launching_needs_world_size_above_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ppo.join_processes("cpu") == (ONE_PROCESS, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")  # `accelerate launch` of one process: no process group either
    assert ppo.join_processes("cpu") == (ONE_PROCESS, torch.device("cpu"))


def test_gradients_go_in_buckets_of_bounded_size():
    sizes = [3, 4, 10, 1, 1, 2]
    buckets = list(_buckets([torch.zeros(n) for n in sizes], limit=5))
    assert [[t.numel() for t in bucket] for bucket in buckets] == [[3], [4], [10], [1, 1, 2]]
    assert list(_buckets([], limit=5)) == []


def test_each_process_samples_with_a_seed_of_its_own():
    assert generation_seed(7, 3, 0) == 7 * 1_000_003 + 3  # rank 0: the one-process seed, unchanged
    seeds = {generation_seed(7, update, rank) % 2**32 for update in (0, 1, 2**20 - 1) for rank in range(4096)}
    assert len(seeds) == 3 * 4096  # distinct where torch's CPU generator looks: the low 32 bits


# ---------------------------------------------------------------------- stand-ins for the launched PPO tests
def toy_reward() -> RewardFn:
    """A `$call` factory: +1 per "the" in the completion (the toy reward of the learning test above)."""
    return lambda prompts, completions: [float(c.count("the")) for c in completions]


def row_seeded_sampler() -> Callable[..., Rollout]:
    """A stand-in for `sample_completions` that samples every prompt alone, seeded by its text and the call count
    (one call per update). The real sampler draws a batch's rows from one shared random stream, so a row's
    completion depends on the rows around it, hence on how prompts are split over processes; here it depends on
    the prompt, the update and the policy only, so one and two processes see the same rollouts."""
    calls = itertools.count()

    def sample(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed, keep_scores=False):
        update = next(calls)
        rows = [sample_completions(model, tokenizer, [prompt], max_new_tokens, temperature, 1,
                                   zlib.crc32(prompt.encode()) + 1_000_003 * update, keep_scores)
                for prompt in prompts]  # fmt: skip
        return stack_rollouts(rows, tokenizer.pad_token_id)

    return sample


def stack_rollouts(rows: list[Rollout], pad_id: int) -> Rollout:
    """One-row rollouts as one batch: prompts left-padded, completions and their scores right-padded."""
    prompt, width = max(r.n_prompt for r in rows), max(r.completion_ids.shape[1] for r in rows)

    def right(t: torch.Tensor, value: float = 0, inner: int = 0) -> torch.Tensor:
        return F.pad(t, (0, 0) * inner + (0, width - t.shape[1]), value=value)

    scores = None
    if rows[0].scores is not None:
        scores = TokenScores(*(torch.cat([right(getattr(r.scores, name), inner=name == "hidden") for r in rows])
                               for name in ("logprobs", "entropy", "hidden")))  # fmt: skip
    return Rollout(
        torch.cat([F.pad(r.prompt_ids, (prompt - r.n_prompt, 0), value=pad_id) for r in rows]),
        torch.cat([F.pad(r.prompt_mask, (prompt - r.n_prompt, 0)) for r in rows]),
        torch.cat([right(r.completion_ids, pad_id) for r in rows]), torch.cat([right(r.completion_mask) for r in rows]),
        torch.cat([r.ended_with_eos for r in rows]), sum((r.texts for r in rows), []), scores,
    )  # fmt: skip


def train_ppo_row_seeded(**kwargs) -> dict[str, float]:
    """`train_ppo` with `row_seeded_sampler` in place of the real sampler: a launched entry point for tests."""
    with mock.patch.object(ppo, "sample_completions", row_seeded_sampler()):
        return ppo.train_ppo(**kwargs)


def test_row_seeded_sampling_does_not_depend_on_the_batch(tiny_checkpoint):
    """The premise of the launched PPO comparison: a prompt's completion and scores are the same whatever rows
    share its batch, and what the stand-in returns is a well-formed batch (scores agree with a policy forward)."""
    policy = ValueHeadModel(load_causal_lm(tiny_checkpoint)).eval()
    tokenizer = load_tokenizer(tiny_checkpoint)
    prompts = ["the cat", "a", "the big red dog ran under a small blue log", "very good"]
    whole = row_seeded_sampler()(policy.lm, tokenizer, prompts, 7, 1.0, 4, 0, keep_scores=True)
    alone = row_seeded_sampler()(policy.lm, tokenizer, prompts[2:], 7, 1.0, 4, 1, keep_scores=True)
    assert whole.texts[2:] == alone.texts and len(set(whole.texts)) > 1
    mask = whole.completion_mask.float()
    width = int(mask[2:].sum(dim=1).max())
    torch.testing.assert_close(whole.scores.logprobs[2:, :width], alone.scores.logprobs[:, :width])
    with torch.no_grad():
        logprobs, _, _ = policy_forward(policy, whole.input_ids, whole.attention_mask, whole.n_prompt, mask, 1.0,
                                        False)  # fmt: skip
    torch.testing.assert_close(whole.scores.logprobs, logprobs, atol=1e-4, rtol=1e-4)
