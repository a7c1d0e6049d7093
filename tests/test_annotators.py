"""Simulated annotator profiles (what they value, how noisy they rank) and active selection of prompts to label."""

from __future__ import annotations

import math
import random

import pytest

from components.annotators import AnnotatorProfile, disagreement, metric_suffix, profiles_from_config
from components.rankings import RankingSettings, rankings_to_pairs
from components.review_task import assign_labellers, build_embedded_splits, embedded_stats, gold_reward
from components.selection import order_disagreement, select_prompts, smallest_gap

GOOD = " the screen is great. the battery is really lovely. overall it is excellent."
STUFFED = " great excellent lovely superb perfect amazing wonderful"
LONG_OK = GOOD + " i bought this phone last month. the case is fine. the price is fair. it does the job."
BAD = " the screen is awful. the battery is poor."


def test_default_profile_is_the_gold_before_squashing_and_ranks_by_it_without_noise():
    plain = AnnotatorProfile("gold", temperature=0.0)
    texts = [BAD, GOOD, STUFFED]
    assert [plain.utility(t) > 0 for t in texts] == [gold_reward(t) > 0 for t in texts]
    by_utility = sorted(range(3), key=lambda i: -plain.utility(texts[i]))
    expected = [by_utility.index(i) + 1 for i in range(3)]
    assert plain.rank(texts, random.Random(0)) == plain.rank(texts, random.Random(1)) == expected
    assert expected[1] == 1  # the well-formed positive review wins


def test_profiles_value_different_things():
    enthusiast = AnnotatorProfile("enthusiast", weights={"sentiment": 2.0, "length_penalty": 1.0,
                                                         "repetition_penalty": 1.0, "stuffing_penalty": 0.0})
    concise = AnnotatorProfile("concise", per_word=0.2)
    assert enthusiast.utility(STUFFED) > enthusiast.utility(GOOD)  # no stuffing penalty: loves the word list
    assert AnnotatorProfile("gold").utility(STUFFED) < AnnotatorProfile("gold").utility(GOOD)
    assert concise.utility(GOOD) > concise.utility(LONG_OK)
    assert disagreement([enthusiast, concise], [STUFFED, GOOD], [GOOD, LONG_OK]) == 0.5
    with pytest.raises(ValueError, match="unknown terms"):
        AnnotatorProfile("x", weights={"fun": 1.0})


def test_noise_follows_plackett_luce():
    """At temperature t, the better of two responses comes first with probability sigmoid(Δu / t)."""
    profile = AnnotatorProfile("gold", temperature=1.0)
    du = profile.utility(GOOD) - profile.utility(BAD)
    rng = random.Random(1)
    first = sum(profile.rank([GOOD, BAD], rng) == [1, 2] for _ in range(4000)) / 4000
    assert first == pytest.approx(1 / (1 + math.exp(-du)), abs=0.03)
    rankings = [{"prompt": "Q:", "responses": [GOOD, BAD, STUFFED], "ranks": profile.rank([GOOD, BAD, STUFFED], rng),
                 "annotator": profile.name}]  # fmt: skip
    assert len(rankings_to_pairs(rankings, RankingSettings("all", "drop"), "sim")) == 3


def test_selection_strategies():
    scores = [[[0.0, 1.0, 2.0]], [[0.0, 0.05, 3.0]], [[1.0, 1.5, 1.6]], [[0.0, 2.0, 4.0]]]
    assert smallest_gap([2.0, 0.0, 0.05]) == pytest.approx(0.05)
    assert select_prompts("uncertainty", scores, 2, seed=0) == [1, 2]
    assert select_prompts("random", scores, 2, seed=0) == select_prompts("random", scores, 2, seed=0)
    assert len(select_prompts("random", scores, 9, seed=0)) == 4
    ensemble = [[[0, 1, 2], [0, 1, 2]], [[0, 1, 2], [2, 1, 0]], [[0, 1, 2], [0, 2, 1]]]
    assert order_disagreement(ensemble[0]) == 0 and order_disagreement(ensemble[1]) == 1
    assert select_prompts("disagreement", ensemble, 2, seed=0) == [1, 2]
    with pytest.raises(ValueError, match="strategy = 'best' is invalid"):
        select_prompts("best", scores, 1, seed=0)


def test_profiles_from_config_refuse_names_unfit_for_metrics_and_duplicates():
    assert [p.name for p in profiles_from_config([{"name": "a", "share": 2}, {"name": "b-2", "per_word": 0.1}])] == [
        "a", "b-2"]
    with pytest.raises(ValueError, match=r"^name = 'a b' is invalid"):
        profiles_from_config([{"name": "a b"}])
    with pytest.raises(ValueError, match=r"^name = .* its own name"):
        profiles_from_config([{"name": "a"}, {"name": "a"}])
    assert metric_suffix("rater 7/b") == "rater_7_b"


def test_labellers_get_exact_shares_in_a_shuffled_order():
    a, b = AnnotatorProfile("a"), AnnotatorProfile("b")
    who = assign_labellers([(a, 2.0), (b, 1.0)], 10, random.Random(0))
    assert sum(w is a for w in who) == 7 and sum(w is b for w in who) == 3  # 6.67 and 3.33, remainder to a
    assert who != sorted(who, key=lambda w: w.name) and assign_labellers([], 3, random.Random(0)) == [None] * 3


def test_diverse_embedded_data_keeps_who_labelled_each_pair():
    """data=embedded_diverse: every profile labels its share of the training and held-out pairs by its own utility;
    the other splits are those of the plain embedded task, and the stats give ceilings per profile."""
    from flows.config import compose_config

    cfg = compose_config(["data=embedded_diverse"])["data"]["embedded"]
    sizes = {"n_sft": 20, "n_preference": 90, "n_eval_preference": 30, "n_prompts": 8, "n_eval_prompts": 8}
    diverse = build_embedded_splits(**{**cfg, **sizes})
    plain = build_embedded_splits(**{**cfg, **sizes, "annotators": ()})
    names = [node["name"] for node in cfg["annotators"]]
    for split, n in (("preference", 90), ("preference_eval", 30)):
        rows = diverse[split]
        assert [sum(r["annotator"] == name for r in rows) for name in names] == [n // 3] * 3
        profiles = {p.name: p for p in profiles_from_config(cfg["annotators"])}
        assert all(r["utility_chosen"] == profiles[r["annotator"]].utility(r["chosen"]) for r in rows)
        assert "annotator" not in plain[split][0]
    assert all(diverse[s] == plain[s] for s in ("sft", "prompts", "eval_prompts"))
    stats = embedded_stats(diverse, cfg["annotator_temperature"], cfg["annotators"])
    assert stats["preference_eval_share/critic"] == pytest.approx(1 / 3)
    assert 0.5 < stats["preference_eval_bayes_ceiling/concise"] <= 1.0
    assert 0 < stats["preference_profile_disagreement"] < 1
    ceilings = [stats[f"preference_eval_bayes_ceiling/{name}"] for name in names]
    assert stats["preference_eval_bayes_ceiling"] == pytest.approx(sum(ceilings) / 3)
