"""Reward model: TRL's RewardTrainer (Bradley–Terry loss) on ranked pairs, judged on held-out pairs.

Held-out accuracy is measured with the same scorer RL uses (prompt + completion + EOS), so the number reported
is the accuracy of the reward the policy actually optimises.

Pairs labelled by several annotator profiles (an `annotator` column) can train one pooled scalar model, or an
annotator-conditioned one (`per_annotator`): one head per profile, each pair's loss on the head of whoever
labelled it. The conditioned model is saved with its profile names (`id2label`, `reward_heads`) and the `mix`
that weights its heads into the one scalar reward RL and evaluation read (`reward_mix`), so every stage that
scores with it works unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from components.annotators import metric_suffix
from components.hooks import StepLogger
from components.modeling import count_trainable, load_reward_model, load_tokenizer
from components.scoring import RewardScorer
from components.settings import CONDITIONINGS, RewardConditioning  # noqa: F401 - re-exported
from components.training import ForwardLogs, LoraSettings, WeightAverage, lora_config, train_and_save


def train_reward_model(
    init_path: str, train: Dataset, args: RewardConfig, output_dir: str | Path, on_log: StepLogger | None = None,
    lora: LoraSettings | None = None, heads: Sequence[str] | None = None, mix: Sequence[float] | None = None,
    ema_decay: float | None = None, length_buckets: int = 1,
) -> dict[str, float]:
    """Train a reward model from `init_path` on preference pairs; save it to `output_dir`.

    Without `heads`: one scalar head (pooled). With `heads` (profile names; `train` has an `annotator` column):
    one head per profile, saved with the profiles and `mix` (one weight per head; None: equal).
    With `lora` the body trains low-rank adapters and the new head trains in full; the checkpoint is saved merged.
    With `ema_decay` the saved weights are their moving average over the steps (`WeightAverage`), not the last
    step's: trained on noisy labels, the average ranks held-out pairs better. With `length_buckets` > 1 each batch
    runs in that many forwards over rows of similar length (`LengthBuckets`): the same loss, less work on padding."""
    tokenizer = load_tokenizer(init_path)
    heads = list(heads or [])
    mix = list(mix) if mix is not None else [1.0 / len(heads) for _ in heads]
    base = partial(_reward_model, init_path, tokenizer, args.seed, heads, mix)  # also what LoRA merges into
    callbacks = [ForwardLogs("reward", on_log), *([WeightAverage(ema_decay)] if ema_decay else [])]
    kwargs = dict(model=base(), args=args, processing_class=tokenizer, callbacks=callbacks,
                  peft_config=lora_config(lora, "SEQ_CLS"), length_buckets=length_buckets)
    if heads:
        with _scalar_view(kwargs["model"]):  # TRL accepts only one output; the loss picks one head per pair
            trainer = ConditionedRewardTrainer(train_dataset=with_heads(train, heads), data_collator=HeadCollator(
                pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of), **kwargs)
    else:
        trainer = BucketedRewardTrainer(train_dataset=train, **kwargs)
    trained = {"reward/n_trainable": float(count_trainable(trainer.model))} if lora else {}
    return train_and_save(trainer, tokenizer, output_dir, "reward", base) | trained


def _reward_model(init_path: str, tokenizer: PreTrainedTokenizerBase, seed: int, heads: Sequence[str] = (),
                  mix: Sequence[float] = ()) -> PreTrainedModel:
    """The reward model before training: `init_path`'s body with a new head (one output, or one per profile in
    `heads`, saved with them and their `mix`), padding like `tokenizer`."""
    set_seed(seed)  # the new head is drawn from the RNG: the same seed gives the same model
    model = load_reward_model(init_path, heads=heads or None)
    model.config.pad_token_id = tokenizer.pad_token_id
    if heads:
        model.config.reward_heads, model.config.reward_mix = list(heads), list(mix)
    return model


def with_heads(pairs: Dataset, heads: Sequence[str]) -> Dataset:
    """`pairs` with a `head` column: the index in `heads` of each pair's annotator (an unknown one is refused)."""
    index = {h: i for i, h in enumerate(heads)}
    missing = sorted({str(a) for a in pairs["annotator"]} - set(index))
    if missing:
        raise ValueError(f"annotators {missing} have no reward head; heads are {list(heads)}")
    return pairs.add_column("head", [index[str(a)] for a in pairs["annotator"]]).remove_columns("annotator")


class _scalar_view:  # noqa: N801 - a context manager named for what it does
    """While open, `model`'s config reports one label (what TRL's RewardTrainer checks at construction)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.config, self.labels = model.config, (model.config.id2label, model.config.label2id)

    def __enter__(self) -> None:
        self.config.id2label, self.config.label2id = {0: "reward"}, {"reward": 0}

    def __exit__(self, *exc: object) -> None:
        self.config.id2label, self.config.label2id = self.labels


@dataclass
class HeadCollator(DataCollatorForPreference):
    """TRL's preference collator that also batches each pair's head index (`head`)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["head"] = torch.tensor([example["head"] for example in examples], dtype=torch.long)
        return batch


class LengthBuckets:
    """`model` called on a right-padded batch as `k` forwards over its rows sorted by length, each cut to its own
    longest row; returns the logits of one call, in the batch's order.

    The outputs are those of one forward: attention is causal and the model reads each row's last real token, so
    the padding after a row changes nothing. A preference batch pads every pair to its longest text (about 40% of
    its positions are real on the embedded task); in groups of similar length most of that work goes.
    """

    def __init__(self, model: Any, k: int) -> None:
        self.model, self.k = model, k

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any) -> Any:
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True)
        logits, outputs = [], None
        for rows in order.chunk(self.k):
            width = int(lengths[rows].max())
            outputs = self.model(input_ids=input_ids[rows, :width], attention_mask=attention_mask[rows, :width],
                                 **inputs)
            logits.append(outputs.logits)
        return type(outputs)(logits=torch.cat(logits)[torch.argsort(order)])


class BucketedRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with its forward in `length_buckets` groups of rows of similar length (`LengthBuckets`).
    Under DDP one backward over the groups' forwards gives the same gradients (tested with two processes); under
    DeepSpeed or FSDP, whose engines gather and free weights around each forward, it keeps one forward (untried)."""

    def __init__(self, *args: Any, length_buckets: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.length_buckets = 1 if self.is_deepspeed_enabled or self.is_fsdp_enabled else length_buckets

    def bucketed(self, model: Any) -> Any:
        """`model`, called in length groups when there is more than one."""
        return LengthBuckets(model, self.length_buckets) if self.length_buckets > 1 else model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(self.bucketed(model), inputs, return_outputs, num_items_in_batch)


class ConditionedRewardTrainer(BucketedRewardTrainer):
    """RewardTrainer for a model with one head per annotator profile: each pair's Bradley–Terry loss (and TRL's
    logged rewards and accuracy) uses the head of the pair's annotator, so each head learns its profile's taste
    while the body is shared."""

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "head" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "head"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head = inputs.pop("head")  # the heads are picked from the whole batch's logits, in its order
        return RewardTrainer.compute_loss(self, HeadOf(self.bucketed(model), head), inputs, return_outputs,
                                          num_items_in_batch)


class HeadOf:
    """`model` read through one head per row: a preference batch (chosen rows, then rejected rows) scored by the
    head of each pair's annotator, as the one-column logits TRL's loss expects."""

    def __init__(self, model: torch.nn.Module, head: torch.Tensor) -> None:
        self.model, self.head = model, head

    def __call__(self, **inputs: Any) -> Any:
        outputs = self.model(**inputs)
        index = torch.cat([self.head, self.head]).to(outputs.logits.device)[:, None]
        outputs.logits = outputs.logits.gather(1, index)
        return outputs


def pairwise_accuracy(scorer: RewardScorer, pairs: Dataset, batch_size: int) -> dict[str, float]:
    """Share of held-out pairs where the reward model scores `chosen` above `rejected` (ties count half), with the
    scalar reward RL optimises; with an `annotator` column also per profile (`reward/eval_accuracy/<profile>`, on the
    pairs it labelled, by its own head when the model has one) and over all pairs that way (`..._own_annotator`)."""
    prompts = list(pairs["prompt"])
    heads = list(getattr(scorer, "heads", None) or [])
    scored = [scorer.score_heads(prompts, list(pairs[side]), batch_size) if heads else
              [[s] for s in scorer.score(prompts, list(pairs[side]), batch_size)] for side in ("chosen", "rejected")]
    mix = scorer.mix if heads else [1.0]
    chosen, rejected = ([sum(w * x for w, x in zip(mix, row, strict=True)) for row in side] for side in scored)
    metrics = {"reward/eval_accuracy": _wins(chosen, rejected),
               "reward/eval_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)}
    if "annotator" not in pairs.column_names:
        return metrics
    annotators = [str(a) for a in pairs["annotator"]]
    own = [(scored[0][i][heads.index(a)], scored[1][i][heads.index(a)]) if a in heads else (chosen[i], rejected[i])
           for i, a in enumerate(annotators)]
    for name in sorted(set(annotators)):
        rows = [own[i] for i, a in enumerate(annotators) if a == name]
        metrics[f"reward/eval_accuracy/{metric_suffix(name)}"] = _wins(*zip(*rows, strict=True))
    metrics["reward/eval_accuracy_own_annotator"] = _wins(*zip(*own, strict=True))
    return metrics


def _wins(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs with chosen > rejected, ties counting half."""
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)]
    return sum(wins) / len(wins)
