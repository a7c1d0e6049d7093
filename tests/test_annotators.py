"""Simulated annotator profiles (what they value, how noisy they rank) and active selection of prompts to label."""

from __future__ import annotations

import math
import random

import pytest

from components.annotators import AnnotatorProfile, disagreement
from components.rankings import RankingSettings, rankings_to_pairs
from components.review_task import gold_reward
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
