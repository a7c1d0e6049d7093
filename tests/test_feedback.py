"""The human feedback stage's plain parts: item keys, Label Studio's ranking result both ways, the rankings store
that keeps a loop resumable, the round's settings, the snapshot the next stage is keyed by, and the config checks.
The loop through a real Label Studio server is tests/test_feedback_loop.py (marker feedback_loop)."""

from __future__ import annotations

import json

import pytest

from components.feedback import (
    FeedbackSettings,
    LabelStore,
    item_key,
    label_studio_task,
    open_items,
    ranker_result,
    ranks_from_result,
)
from components.rankings import RankingSettings, rankings_to_pairs
from flows.config import ConfigError, compose_config, validate_config
from flows.feedback import _snapshot


def test_item_key_depends_on_prompt_and_responses_in_order():
    key = item_key("p", ["a", "b"])
    assert key == item_key("p", ["a", "b"]) and len(key) == 16
    assert key != item_key("p", ["b", "a"]) and key != item_key("q", ["a", "b"])


def test_task_carries_prompt_responses_and_key():
    task = label_studio_task({"key": "k", "prompt": "P", "responses": ["x", "y", "z"]})
    assert task["data"]["item_key"] == "k" and task["data"]["prompt"] == "P"
    assert [e["id"] for e in task["data"]["items"]] == ["r0", "r1", "r2"]
    assert [e["body"] for e in task["data"]["items"]] == ["x", "y", "z"]


@pytest.mark.parametrize("ranks", [[1, 2, 3], [3, 1, 2], [2, 3, 1, 4]])
def test_ranker_result_round_trips(ranks):
    assert ranks_from_result(ranker_result(ranks), len(ranks)) == ranks


def test_ranker_result_as_label_studio_stores_it():
    result = [{"from_name": "rank", "to_name": "responses", "type": "ranker",
               "value": {"ranker": {"responses": ["r2", "r0", "r1"]}}}]
    assert ranks_from_result(result, 3) == [2, 3, 1]  # r2 first: response 3 is best


@pytest.mark.parametrize("result", [
    [],  # skipped
    [{"type": "choices", "value": {"choices": ["a"]}}],
    [{"type": "ranker", "value": {"ranker": {"responses": ["r0", "r1"]}}}],  # one response left out
    [{"type": "ranker", "value": {"ranker": {"responses": ["r0", "r0", "r1"]}}}],
])
def test_partial_or_foreign_results_give_no_ranking(result):
    assert ranks_from_result(result, 3) is None


def _ranking(key: str, annotator: str, ranks=(1, 2, 3)) -> dict:
    return {"key": key, "prompt": f"prompt {key}", "responses": ["a", "b", "c"], "ranks": list(ranks),
            "annotator": annotator, "source": "test"}


def test_store_keeps_one_ranking_per_item_and_annotator(tmp_path):
    store = LabelStore(tmp_path / "labels" / "rankings.jsonl")
    assert store.add([_ranking("k1", "ann"), _ranking("k2", "ann")]) == 2
    assert store.add([_ranking("k1", "ann", (3, 2, 1)), _ranking("k1", "other")]) == 1  # k1/ann is kept as given
    assert store.labelled_keys() == {"k1", "k2"}
    assert [r["ranks"] for r in store.rows() if r["annotator"] == "ann" and r["key"] == "k1"] == [[1, 2, 3]]


def test_store_skips_a_torn_last_line(tmp_path):
    store = LabelStore(tmp_path / "rankings.jsonl")
    store.add([_ranking("k1", "ann")])
    with store.path.open("a") as out:
        out.write('{"key": "k2", "ann')  # a crash mid-write
    assert store.labelled_keys() == {"k1"}


def test_open_items_leave_out_what_was_ranked():
    items = [{"key": k, "prompt": k, "responses": ["a", "b"]} for k in ("k1", "k2", "k3")]
    assert [i["key"] for i in open_items(items, {"k2"})] == ["k1", "k3"]


def test_snapshot_is_keyed_by_content_of_this_rounds_rankings(tmp_path):
    store = LabelStore(tmp_path / "rankings.jsonl")
    store.add([_ranking("k1", "ann"), _ranking("k9", "ann")])
    first = _snapshot(store, {"k1", "k2"}, tmp_path / "snapshots")
    assert first["n_rankings"] == 1 and first == _snapshot(store, {"k1", "k2"}, tmp_path / "snapshots")
    store.add([_ranking("k2", "ann")])
    second = _snapshot(store, {"k1", "k2"}, tmp_path / "snapshots")
    assert second["manifest"]["digest"] != first["manifest"]["digest"] and second["n_rankings"] == 2
    rows = [json.loads(line) for line in open(second["path"])]
    pairs = rankings_to_pairs(rows, RankingSettings("all", "drop"), "snapshot")
    assert len(pairs) == 6 and {p["annotator"] for p in pairs} == {"ann"}


@pytest.mark.parametrize(("change", "field"), [
    ({"budget": 0}, "budget"),
    ({"n_responses": 1}, "n_responses"),
    ({"strategy": "loudest"}, "strategy"),
    ({"strategy": "disagreement", "n_scorers": 1}, "strategy"),
])
def test_settings_refuse_what_cannot_work(change, field):
    base = {"n_candidates": 8, "n_responses": 4, "budget": 4, "strategy": "random"}
    with pytest.raises(ValueError, match=rf"^{field} = "):
        FeedbackSettings(**(base | change))


@pytest.mark.parametrize(("overrides", "field"), [
    (["feedback.strategy=uncertainty"], "feedback.strategy"),
    (["pipeline=rlaif"], "feedback"),
    (["feedback.wait.mode=forever"], "feedback.wait.mode"),
    (["feedback.wait.min_labelled=0"], "feedback.wait.min_labelled"),
    (["feedback.source=policy"], "feedback.policy_path"),
    (["feedback.label_studio.url=localhost:8080"], "feedback.label_studio.url"),
    (["feedback.rankings.pairs=some"], "feedback.rankings.pairs"),
])
def test_bad_feedback_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"config field `{field}`"):
        validate_config(compose_config(["feedback=human_loop", *overrides]))


def test_rankings_from_label_studio_can_train_one_head_per_annotator():
    validate_config(compose_config(["feedback=human_loop", "reward.conditioning=per_annotator"]))


def test_default_runs_without_feedback_stage():
    cfg = compose_config([])
    assert cfg["feedback"] == {"loop": False}
    validate_config(compose_config(["feedback=human_loop", "pipeline=dpo"]))
