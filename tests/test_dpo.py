"""DPO with TRL from a tiny checkpoint: config, logged metrics, a reloadable model, and a learned preference.

The learning check is measured here, independently of TRL's own metrics: on the training pairs, the policy's
log-probability margin of chosen over rejected must grow relative to the reference (the starting checkpoint).
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hydra.utils import instantiate

from components.dpo import train_dpo
from components.modeling import build_base_checkpoint, load_causal_lm, load_tokenizer
from components.review_task import build_embedded_splits, corpus
from flows.config import compose_config

ARCH = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 96}


pytestmark = pytest.mark.usefixtures("one_thread")


def dpo_args(output_dir: Path, **overrides):
    """`conf/dpo/default.yaml`'s DPOConfig as Hydra composes it (with the shared conf/trainer/ settings) and
    test-sized `dpo.args.<key>=value` overrides, instantiated the way the flow does."""
    cfg = compose_config([f"dpo.args.{key}={value}" for key, value in overrides.items()])
    return instantiate(cfg["dpo"]["args"], output_dir=str(output_dir))


def clear_pairs(rows: list[dict], min_gap: float, tokenizer, max_tokens: int) -> Dataset:
    """Preference pairs relabelled by the gold reward (no annotator noise), keeping gold gaps above `min_gap` and
    texts that fit `max_tokens` whole (so training sees what the margin check measures)."""
    fits = lambda p, c: len(tokenizer(p + c + tokenizer.eos_token)["input_ids"]) <= max_tokens  # noqa: E731
    pairs = []
    for r in rows:
        if abs(r["gold_chosen"] - r["gold_rejected"]) < min_gap or not (
            fits(r["prompt"], r["chosen"]) and fits(r["prompt"], r["rejected"])
        ):
            continue
        good, bad = (
            (r["chosen"], r["rejected"]) if r["gold_chosen"] > r["gold_rejected"] else (r["rejected"], r["chosen"])
        )
        pairs.append({"prompt": r["prompt"], "chosen": good, "rejected": bad})
    return Dataset.from_list(pairs)


@torch.no_grad()
def completion_logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """Sum of log π(completion + EOS | prompt), the quantity DPO's implicit reward is built from."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1 :].sum())


def mean_margin(model, tokenizer, pairs: Dataset) -> float:
    """Mean of log π(chosen) − log π(rejected) over `pairs`."""
    margins = [completion_logprob(model, tokenizer, p["prompt"], p["chosen"])
               - completion_logprob(model, tokenizer, p["prompt"], p["rejected"]) for p in pairs]  # fmt: skip
    return sum(margins) / len(margins)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """One short DPO run on clear pairs from a random tiny checkpoint (the reference); ~10 s on one core.

    Its own checkpoint, not the shared `tiny_checkpoint`: the pairs are review-task texts, so the tokenizer is
    trained on the task corpus, and n_positions 96 holds each pair whole (the margin check scores whole texts)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dpo")
    splits = build_embedded_splits(n_sft=100, n_preference=300, n_eval_preference=10, n_prompts=10,
                                   n_eval_prompts=10, annotator_temperature=0.2, seed=0)  # fmt: skip
    ref_path = build_base_checkpoint(corpus(splits), ARCH, 256, 0, root / "base")
    pairs = clear_pairs(splits["preference"], 1.0, load_tokenizer(ref_path), ARCH["n_positions"]).select(range(96))
    logs: list[tuple[int, dict[str, float]]] = []
    args = dpo_args(root / "trainer", per_device_train_batch_size=16, num_train_epochs=2, learning_rate=3e-3,
                    warmup_steps=0, logging_steps=2)  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()) as stderr:  # where tqdm bars would go
        summary = train_dpo(ref_path, pairs, args, root / "model", lambda step, m: logs.append((step, m)))
    return {"summary": summary, "logs": logs, "ref": ref_path, "out": root / "model", "pairs": pairs,
            "stderr": stderr.getvalue()}


def test_trl_progress_bars_stay_out_of_the_stage_output(dpo_run):
    """TRL's own "Computing reference log probs" bar used to leak into the DPO stage's output."""
    assert "reference log probs" not in dpo_run["stderr"]


def test_yaml_is_a_cpu_ready_dpo_config(tmp_path):
    args = dpo_args(tmp_path)
    assert type(args).__name__ == "DPOConfig"
    assert args.beta == pytest.approx(0.1) and args.learning_rate == pytest.approx(6e-4)
    assert not args.bf16 and not args.gradient_checkpointing and args.report_to == []
    assert args.save_strategy == "no" and args.disable_tqdm


def test_summary_has_finite_dpo_metrics(dpo_run):
    summary = dpo_run["summary"]
    for key in ("dpo/rewards_margin", "dpo/accuracy", "dpo/loss", "dpo/train_loss", "dpo/train_seconds"):
        assert key in summary and math.isfinite(summary[key]), key
    assert 0.0 <= summary["dpo/accuracy"] <= 1.0
    assert summary["dpo/steps"] == 12  # 96 pairs / 16 per step × 2 epochs
    logged = {k for _, m in dpo_run["logs"] for k in m}
    assert {"dpo/loss", "dpo/rewards/margins", "dpo/rewards/accuracies"} <= logged


def test_saved_model_reloads_and_generates(dpo_run):
    tokenizer = load_tokenizer(str(dpo_run["out"]))
    model = load_causal_lm(str(dpo_run["out"])).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    reference = load_causal_lm(dpo_run["ref"])
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    assert changed, "DPO did not change the weights"
    enc = tokenizer(["Review of the kettle:", "Review of the black phone:"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=8, do_sample=True)
    assert out.shape[0] == 2 and out.shape[1] > enc.input_ids.shape[1]


def test_dpo_widens_the_chosen_over_rejected_margin_relative_to_reference(dpo_run):
    tokenizer = load_tokenizer(dpo_run["ref"])
    before = mean_margin(load_causal_lm(dpo_run["ref"]).eval(), tokenizer, dpo_run["pairs"])
    after = mean_margin(load_causal_lm(str(dpo_run["out"])).eval(), tokenizer, dpo_run["pairs"])
    assert after - before > 1.0, (before, after)
    assert dpo_run["summary"]["dpo/rewards_margin"] > 0.0
