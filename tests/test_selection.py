"""Choosing prompts to label within a budget (components/selection.py): the three strategies by hand, and the
bookkeeping of pool-based active learning that benchmarks/bench_feedback.py runs (schedule, pool indices,
bootstrap members, labels needed to reach a target accuracy). Pure functions: no model, no training."""

from __future__ import annotations

import pytest

from components.selection import (
    bootstrap,
    label_schedule,
    label_share,
    labels_to_reach,
    mean_curve,
    most_informative,
    order_disagreement,
    pair_information,
    select_from_pool,
    select_prompts,
    smallest_gap,
)

# three prompts, one reward model, three responses each: prompt 1's responses are the hardest to tell apart
ONE_MODEL = [[[0.0, 1.0, 2.0]], [[0.0, 0.1, 2.0]], [[0.0, 0.5, 3.0]]]


def test_smallest_gap_and_order_disagreement_by_hand():
    assert smallest_gap([3.0, 0.0, 1.0]) == pytest.approx(1.0)
    assert order_disagreement([[0.0, 1.0], [0.0, 2.0]]) == 0.0  # both rank response 1 first
    assert order_disagreement([[0.0, 1.0], [1.0, 0.0]]) == 1.0  # an even split
    assert order_disagreement([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]]) == pytest.approx(2 / 9)


def test_select_prompts_by_strategy():
    assert select_prompts("uncertainty", ONE_MODEL, 1, seed=0) == [1]
    assert select_prompts("uncertainty", ONE_MODEL, 2, seed=0) == [1, 2]
    split = [[[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]  # the models disagree on prompt 1 only
    assert select_prompts("disagreement", split, 1, seed=0) == [1]
    chosen = select_prompts("random", ONE_MODEL * 10, 5, seed=3)
    assert chosen == sorted(chosen) and len(set(chosen)) == 5
    assert chosen == select_prompts("random", ONE_MODEL * 10, 5, seed=3)  # seeded
    assert select_prompts("random", ONE_MODEL, 10, seed=0) == [0, 1, 2]  # at most the pool
    with pytest.raises(ValueError, match="strategy = 'loudest'"):
        select_prompts("loudest", ONE_MODEL, 1, seed=0)


def test_label_schedule_lands_on_the_budget():
    assert label_schedule(20, 20, 100) == [20, 40, 60, 80, 100]
    assert label_schedule(30, 25, 100) == [30, 55, 80, 100]
    assert label_schedule(50, 10, 50) == [50]
    with pytest.raises(ValueError, match="budget = 10"):
        label_schedule(20, 10, 10)


def test_select_from_pool_returns_pool_indices():
    candidates = [4, 7, 9]  # what is left of the pool; scores row i belongs to candidates[i]
    assert select_from_pool("uncertainty", candidates, ONE_MODEL, 1, seed=0) == [7]
    assert select_from_pool("random", candidates, ONE_MODEL, 3, seed=0) == [4, 7, 9]
    with pytest.raises(ValueError, match="3 candidates but 2 rows"):
        select_from_pool("random", candidates, ONE_MODEL[:2], 1, seed=0)


def test_bootstrap_is_seeded_and_draws_from_the_items():
    items = list(range(10, 30))
    sample = bootstrap(items, seed=1)
    assert len(sample) == len(items) and set(sample) <= set(items)
    assert sample == bootstrap(items, seed=1) and sample != bootstrap(items, seed=2)
    assert len(set(sample)) < len(items)  # with replacement (20 draws from 20 repeat one with near certainty)


def test_labels_to_reach_interpolates_between_rounds():
    labels, accuracy = [20, 40, 60], [0.70, 0.80, 0.84]
    assert labels_to_reach(labels, accuracy, 0.75) == pytest.approx(30.0)
    assert labels_to_reach(labels, accuracy, 0.84) == pytest.approx(60.0)
    assert labels_to_reach(labels, accuracy, 0.60) == 20.0  # reached from the first round
    assert labels_to_reach(labels, accuracy, 0.90) is None
    assert labels_to_reach([20, 40, 60], [0.70, 0.82, 0.79], 0.80) == pytest.approx(20 + 20 * 0.10 / 0.12)
    with pytest.raises(ValueError, match="3 label counts but 2"):
        labels_to_reach(labels, accuracy[:2], 0.8)


def test_label_share_against_the_baseline_and_mean_curve():
    baseline = ([20, 40, 60, 80], [0.70, 0.75, 0.78, 0.80])
    assert label_share([20, 40, 60, 80], [0.72, 0.80, 0.82, 0.83], *baseline) == pytest.approx(0.5)
    assert label_share(*baseline, *baseline) == pytest.approx(1.0)
    assert label_share([20, 40], [0.7, 0.71], *baseline) is None
    assert mean_curve([[0.6, 0.8], [0.7, 0.9]]) == pytest.approx([0.65, 0.85])
    with pytest.raises(ValueError, match="equal length"):
        mean_curve([[0.6], [0.7, 0.9]])


def test_pair_information_counts_every_pair():
    assert pair_information([0.0, 0.0]) == pytest.approx(1.0)  # a coin flip
    assert pair_information([0.0, 20.0]) == pytest.approx(0.0, abs=1e-6)  # sure
    assert pair_information([1.0, 0.0]) == pytest.approx(pair_information([0.0, 1.0]))
    # one tied pair among sure ones counts less than all pairs moderately close
    assert pair_information([0.0, 0.0, 20.0, 40.0]) < pair_information([0.0, 1.0, 2.0, 3.0])
    assert select_prompts("uncertainty", [[[0.0, 0.0, 20.0, 40.0]], [[0.0, 1.0, 2.0, 3.0]]], 1, seed=0) == [0]
    assert most_informative([[[0.0, 0.0, 20.0, 40.0]], [[0.0, 1.0, 2.0, 3.0]]], 1) == [1]
    assert most_informative([[[0.0, 9.0], [0.0, -9.0]], [[0.0, 3.0], [0.0, 3.0]]], 1) == [0]  # mean of M models
    assert most_informative(ONE_MODEL, 5) == [0, 1, 2]
