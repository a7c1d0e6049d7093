"""RLOO and GRPO with TRL from a briefly fine-tuned tiny checkpoint, against a toy reward callable.

Covers the configs (they instantiate, and their batch sizes divide as TRL requires), the reward adapter (TRL's
keyword signature, the missing-EOS penalty), the logged and returned metrics, the saved model, and that short runs
raise a simple reward.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from components.generation import sample_completions
from components.modeling import build_base_checkpoint, load_causal_lm, load_tokenizer
from components.review_task import build_embedded_splits, corpus, words_of
from components.sft import train_sft
from components.trl_rl import as_trl_reward, positions_from_mask, train_grpo, train_rloo
from flows.config import compose_config

ARCH = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 96}
WORD = "the"
TRAINERS = {"rloo": train_rloo, "grpo": train_grpo}


pytestmark = pytest.mark.usefixtures("one_thread")


def count_word(prompts: list[str], completions: list[str]) -> list[float]:
    """Toy reward: +1 per occurrence of WORD in the completion."""
    return [float(words_of(c).count(WORD)) for c in completions]


def group_config(group: str, name: str, **overrides) -> DictConfig:
    """The config as Hydra composes it with `group=name` (shared conf/trainer/ settings included) and
    `group.key=value` overrides; interpolations such as `${rl.max_new_tokens}` see the overrides."""
    return OmegaConf.create(compose_config([f"{group}={name}", *(f"{group}.{k}={v}" for k, v in overrides.items())]))


def rl_run(algo: str, sft_path: str, prompts: Dataset, out: Path, **overrides) -> tuple[dict, list]:
    """Train `algo` from its YAML with test-sized `overrides`; return the summary and every on_log call."""
    cfg = group_config("rl", algo, **overrides)
    args = instantiate(cfg.rl.args, output_dir=str(out / "trainer"))
    logs: list[tuple[int, dict[str, float]]] = []
    summary = TRAINERS[algo](sft_path, prompts, count_word, args, cfg.rl.missing_eos_penalty, out / "model",
                             lambda step, m: logs.append((step, m)))  # fmt: skip
    return summary, logs


SMALL = {"max_new_tokens": 16, "args.per_device_train_batch_size": 16, "args.num_generations": 4,
         "args.logging_steps": 2, "args.learning_rate": 1e-3}  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    """A tiny GPT-2 fine-tuned for a few steps on embedded demonstrations, plus training prompts (~5 s).

    Its own checkpoint, not the shared `tiny_checkpoint`: SFT on the review task needs a tokenizer trained on
    the task corpus (prompts such as `Review of the kettle:`), and n_positions 96 for prompt + completion."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trl_rl")
    splits = build_embedded_splits(n_sft=320, n_preference=10, n_eval_preference=10, n_prompts=64,
                                   n_eval_prompts=32, annotator_temperature=0.2, seed=0)  # fmt: skip
    base = build_base_checkpoint(corpus(splits), ARCH, 256, 0, root / "base")
    cfg = group_config("sft", "default", **{"args.num_train_epochs": 2, "args.learning_rate": 3e-3})
    train_sft(base, Dataset.from_list(splits["sft"]), instantiate(cfg.sft.args, output_dir=str(root / "t")),
              root / "sft")  # fmt: skip
    return {"sft": str(root / "sft"), "prompts": Dataset.from_list(splits["prompts"]),
            "eval_prompts": [r["prompt"] for r in splits["eval_prompts"]], "root": root}  # fmt: skip


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_yaml_is_cpu_ready_with_kl_and_dividing_batches(algo, tmp_path):
    cfg = group_config("rl", algo)
    args = instantiate(cfg.rl.args, output_dir=str(tmp_path))
    assert type(args).__name__ == {"rloo": "RLOOConfig", "grpo": "GRPOConfig"}[algo]
    assert cfg.rl.algorithm == algo and cfg.rl.reward_batch_size > 0
    assert args.beta > 0, "beta > 0 keeps the KL to the SFT model (and its `kl` metric)"
    assert args.max_completion_length == cfg.rl.max_new_tokens
    assert args.generation_batch_size % args.num_generations == 0
    assert not args.bf16 and not args.gradient_checkpointing and args.report_to == [] and not args.use_vllm


def test_reward_adapter_takes_trl_keywords_and_penalises_missing_eos():
    reward = as_trl_reward(count_word, eos_token_ids=[1], missing_eos_penalty=0.5)
    logged: list[tuple[str, float]] = []
    scores = reward(prompts=["p", "p"], completions=["the the", "the"], completion_ids=[[5, 6, 1], [5, 6]],
                    trainer_state=None, log_metric=lambda k, v: logged.append((k, v)), extra_column=[0, 0])  # fmt: skip
    assert scores == [2.0, 0.5]
    assert logged == [("reward_model_score", 1.5)]  # the raw scores' mean, before the penalty
    assert as_trl_reward(count_word, [1], None)(prompts=["p"], completions=["x"], completion_ids=[[5]]) == [0.0]
    with pytest.raises(TypeError):
        reward(prompts=[[{"role": "user", "content": "p"}]], completions=["x"], completion_ids=[[1]])


@torch.no_grad()
def test_positions_from_mask_makes_left_padding_harmless(task):
    """TRL scores left-padded rows without position ids; GPT-2 then reads pads as positions unless patched.
    Generation passes its own position ids, so the patch leaves it unchanged."""
    tokenizer, model = load_tokenizer(task["sft"]), load_causal_lm(task["sft"]).eval()
    prompts = ["Review of the kettle:", "Review of the large black phone:"]
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    assert batch.attention_mask[0, 0] == 0, "the first prompt must be left-padded"
    alone = model(**tokenizer(prompts[:1], return_tensors="pt")).logits[0, -1]
    assert not torch.allclose(model(**batch).logits[0, -1], alone, atol=1e-4)
    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False)
    positions_from_mask(model)
    assert torch.allclose(model(**batch).logits[0, -1], alone, atol=1e-4)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), greedy)


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_trains_logs_and_saves_a_reloadable_policy(algo, task):
    out = task["root"] / f"{algo}_short"
    summary, logs = rl_run(algo, task["sft"], task["prompts"], out, **SMALL, **{"args.max_steps": 4})
    assert summary[f"{algo}/steps"] == 4
    for key in ("mean_reward", "mean_score", "kl", "train_seconds", "mean_length", "entropy"):
        assert math.isfinite(summary[f"{algo}/{key}"]), key
    logged = {k for _, m in logs for k in m}
    assert {f"{algo}/reward", f"{algo}/reward_model_score", f"{algo}/kl", f"{algo}/rewards/reward_model/mean"} <= logged
    assert all(k.startswith(f"{algo}/") for k in logged)
    tokenizer, model = load_tokenizer(str(out / "model")), load_causal_lm(str(out / "model")).eval()
    rollout = sample_completions(model, tokenizer, task["eval_prompts"][:4], 8, 1.0, 4, 0)
    assert len(rollout.texts) == 4


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_short_run_raises_a_toy_reward(algo, task):
    """20 steps take ~1 s; over seeds 0-2 the mean count went from ~0.3 to 0.8-1.3 (sampled on held-out prompts)."""
    out = task["root"] / f"{algo}_learn"
    rl_run(algo, task["sft"], task["prompts"], out, **SMALL, **{"args.max_steps": 20, "args.beta": 0.01})
    prompts = task["eval_prompts"]

    def mean_reward(path: str) -> float:
        rollout = sample_completions(load_causal_lm(path).eval(), load_tokenizer(path), prompts, 16, 1.0, 32, 0)
        return sum(count_word(prompts, rollout.texts)) / len(prompts)

    before, after = mean_reward(task["sft"]), mean_reward(str(out / "model"))
    assert after > before + 0.3, (before, after)
