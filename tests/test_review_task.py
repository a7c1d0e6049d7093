"""Tests for the embedded task: determinism, the gold reward's ordering, the annotator, the split layout."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest

from components import review_task as E

POSITIVE = " the screen is great. the battery is really solid. overall it is lovely."
NEGATIVE = " the screen is terrible. the battery is really flimsy. overall it is awful."


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return E.build_embedded_splits(
        n_sft=600, n_preference=400, n_eval_preference=300, n_prompts=100, n_eval_prompts=200,
        annotator_temperature=0.2, seed=0,
    )  # fmt: skip


def _build(seed: int, n_preference: int = 50) -> dict[str, list[dict]]:
    return E.build_embedded_splits(60, n_preference, 30, 20, 20, 0.2, seed)


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    assert _build(3) == _build(3)
    assert _build(3)["sft"] != _build(4)["sft"]


def test_splits_are_independent_streams() -> None:
    """Changing one split's size leaves the others unchanged (so upstream caches stay valid)."""
    a, b = _build(5, n_preference=50), _build(5, n_preference=80)
    assert a["sft"] == b["sft"] and a["eval_prompts"] == b["eval_prompts"]
    assert a["preference"] == b["preference"][:50]


def test_split_layout(splits: dict[str, list[dict]]) -> None:
    assert {k: len(v) for k, v in splits.items()} == {
        "sft": 600, "preference": 400, "preference_eval": 300, "prompts": 100, "eval_prompts": 200,
    }  # fmt: skip
    assert set(splits["sft"][0]) == {"prompt", "completion"}
    assert set(splits["prompts"][0]) == set(splits["eval_prompts"][0]) == {"prompt"}
    for name in ("preference", "preference_eval"):
        for row in splits[name]:
            assert set(row) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}
            assert row["chosen"] != row["rejected"]
            assert row["gold_chosen"] == E.gold_reward(row["chosen"])
            assert row["gold_rejected"] == E.gold_reward(row["rejected"])
    for row in splits["sft"]:
        assert row["prompt"].startswith("Review of the ") and row["prompt"].endswith(":")
        assert row["completion"].startswith(" ") and row["completion"].strip()


def test_held_out_topics_only_in_eval(splits: dict[str, list[dict]]) -> None:
    for name in ("sft", "preference", "prompts"):
        assert not {E.topic_of(r["prompt"]) for r in splits[name]} & set(E.HELD_OUT_TOPICS), name
    for name in ("eval_prompts", "preference_eval"):
        topics = [E.topic_of(r["prompt"]) for r in splits[name]]
        held_out = sum(t in E.HELD_OUT_TOPICS for t in topics) / len(topics)
        assert 0.3 < held_out < 0.7, name


def test_gold_orders_positive_over_negative_and_degenerate() -> None:
    positive = E.gold_reward(POSITIVE)
    assert positive > 0.8 > -0.8 > E.gold_reward(NEGATIVE)
    degenerate = [
        "",
        " great",
        " great.",
        " great great great great",
        " great " * 12,
        " the screen is great. the screen is great. the screen is great.",
        " great excellent superb amazing perfect wonderful lovely brilliant",  # keyword stuffing
        POSITIVE * 4,  # ramble: too long and repetitive
    ]
    for text in degenerate:
        assert E.gold_reward(text) < positive - 1.0, text
    assert E.gold_reward(" great great great great") < E.gold_reward(NEGATIVE)
    assert E.gold_reward(" great") < E.gold_reward(NEGATIVE)


def test_gold_is_bounded_and_vectorised() -> None:
    rng = random.Random(0)
    texts = [E.generate_completion(rng.choice(E.TOPICS), q, rng) for q in E.QUALITIES for _ in range(50)]
    golds = E.gold_rewards(texts)
    assert golds == [E.gold_reward(t) for t in texts]
    assert all(-2.0 < g < 2.0 for g in golds)
    terms = E.gold_terms(POSITIVE)
    assert set(terms) == {"sentiment", "length_penalty", "repetition_penalty", "stuffing_penalty", "gold"}


def test_quality_classes_are_ordered_on_gold() -> None:
    rng = random.Random(1)
    means = {}
    for quality in E.QUALITIES:
        texts = [E.generate_completion(rng.choice(E.TOPICS), quality, rng) for _ in range(300)]
        means[quality] = statistics.mean(E.gold_rewards(texts))
    assert means["positive"] > 0.7 > means["mixed"] > -0.5 > means["negative"] > means["degenerate"]


def test_well_formed_completions_have_target_length() -> None:
    rng = random.Random(2)
    for quality in ("positive", "mixed", "negative"):
        for _ in range(100):
            n = len(E.words_of(E.generate_completion(rng.choice(E.TOPICS), quality, rng)))
            assert E.TARGET_WORDS[0] <= n <= E.TARGET_WORDS[1]
    with pytest.raises(ValueError, match="unknown quality"):
        E.generate_completion("phone", "superb", rng)


def test_annotator_agreement_rises_as_temperature_falls() -> None:
    rng = random.Random(0)
    pairs = [(rng.uniform(-2, 2), rng.uniform(-2, 2)) for _ in range(2000)]
    agreement = []
    for temperature in (2.0, 0.5, 0.1):
        labels = [E.annotate_pair(a, b, temperature, rng) == (a > b) for a, b in pairs]
        agreement.append(sum(labels) / len(labels))
    assert agreement[0] < agreement[1] < agreement[2]
    assert E.annotate_pair(1.0, -1.0, 0.0, rng) and not E.annotate_pair(-1.0, 1.0, 0.0, rng)
    assert isinstance(E.annotate_pair(0.3, 0.1, 0.2, np.random.default_rng(0)), bool)


def test_label_accuracy_of_built_data_falls_with_temperature() -> None:
    accuracy = []
    for temperature in (0.05, 0.3, 1.5):
        rows = E.build_embedded_splits(0, 0, 600, 0, 0, temperature, 0)["preference_eval"]
        chosen, rejected = [r["gold_chosen"] for r in rows], [r["gold_rejected"] for r in rows]
        accuracy.append(E.label_accuracy(chosen, rejected))
        assert 0.5 < E.bayes_ceiling(chosen, rejected, temperature) <= 1.0
    assert accuracy[0] > accuracy[1] > accuracy[2]


def test_bayes_ceiling() -> None:
    assert E.bayes_ceiling([1.0, -1.0], [-1.0, 1.0], 0.0) == 1.0
    assert E.bayes_ceiling([0.5], [0.5], 0.2) == pytest.approx(0.5)
    assert E.bayes_ceiling([1.0], [0.0], 1.0) == pytest.approx(1 / (1 + np.exp(-1.0)))
    with pytest.raises(ValueError):
        E.bayes_ceiling([], [], 0.2)


def test_stats(splits: dict[str, list[dict]]) -> None:
    stats = E.embedded_stats(splits, 0.2)
    assert abs(stats["sft_mean_gold"]) < 0.3  # mediocre demonstrations: RL/DPO have room to improve
    assert 0.5 < stats["preference_eval_bayes_ceiling"] <= 1.0
    assert 0.5 < stats["preference_eval_label_accuracy"] <= 1.0
    assert stats["preference_mean_gold_chosen"] > stats["preference_mean_gold_rejected"]
    assert stats["n_sft"] == 600.0
    assert all(isinstance(v, float) for v in stats.values())


def test_corpus_covers_every_task_word(splits: dict[str, list[dict]]) -> None:
    texts = E.corpus(splits)
    words = set(E.words_of(" ".join(texts)))
    assert set(E.POLARITY) <= words and set(E.TOPICS) <= words
    assert splits["sft"][0]["prompt"] + splits["sft"][0]["completion"] in texts
    other = {"x": [{"messages": [{"role": "user", "content": "hi"}]}, {"text": "abc"}, {"prompt": "P:"}]}
    assert E.corpus(other)[-3:] == ["hi", "abc", "P:"]


def test_tokenizer_corpus_leaves_the_held_out_splits_out(splits: dict[str, list[dict]]) -> None:
    """The held-out pairs and prompts measure the models; the tokenizer every model is built on must not see them,
    so changing their size or content changes no model."""
    bigger = E.build_embedded_splits(
        n_sft=600, n_preference=400, n_eval_preference=900, n_prompts=100, n_eval_prompts=50,
        annotator_temperature=0.2, seed=0,
    )  # fmt: skip
    assert bigger["preference_eval"] != splits["preference_eval"]
    assert E.corpus(bigger) == E.corpus(splits)
    held_out = splits["preference_eval"][0]
    assert held_out["prompt"] + held_out["chosen"] not in E.corpus(splits)
