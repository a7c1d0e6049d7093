"""Ranked responses as data: rankings of K become pairs (all or adjacent, ties dropped or kept both ways), keep
their annotator, and flow through `data=files` like pairs, held out by ranking so no prompt straddles the split."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from components import data as D
from components.rankings import RankingSettings, best_responses, ranked_pairs, rankings_to_pairs
from flows.config import ConfigError, compose_config, validate_config

ALL, ADJACENT = RankingSettings("all", "drop"), RankingSettings("adjacent", "drop")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))


def test_ranked_pairs_by_hand():
    ranks = [2, 1, 3]  # response 1 best, then 0, then 2
    assert ranked_pairs(ranks, ALL) == [(1, 0), (1, 2), (0, 2)]
    assert ranked_pairs(ranks, ADJACENT) == [(1, 0), (0, 2)]
    tied = [1, 2, 2, 3]
    assert ranked_pairs(tied, ALL) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # the 2-2 tie makes no pair
    assert ranked_pairs(tied, RankingSettings("all", "both")) == [(0, 1), (0, 2), (0, 3), (1, 2), (2, 1), (1, 3),
                                                                  (2, 3)]  # fmt: skip
    assert ranked_pairs(tied, ADJACENT) == [(0, 1), (2, 3)]
    assert len(ranked_pairs([1, 2, 3, 4, 5], ALL)) == 10  # K(K-1)/2


def test_rankings_to_pairs_keep_the_annotator_and_best_response_is_the_demo():
    rows = [{"prompt": "Q:", "responses": [" ok", " great", " bad"], "ranks": [2, 1, 3], "annotator": 7},
            {"prompt": "R:", "responses": [" a", " b"], "ranks": [1, 1]}]  # fmt: skip
    pairs = rankings_to_pairs(rows, ALL, "f.jsonl")
    assert pairs == [{"prompt": "Q:", "chosen": " great", "rejected": " ok", "annotator": "7"},
                     {"prompt": "Q:", "chosen": " great", "rejected": " bad", "annotator": "7"},
                     {"prompt": "Q:", "chosen": " ok", "rejected": " bad", "annotator": "7"}]  # fmt: skip
    assert best_responses(rows, "f.jsonl") == [{"prompt": "Q:", "completion": " great"},
                                               {"prompt": "R:", "completion": " a"}]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Q:", "responses": [" a"], "ranks": [1]}, r"row 0, field 'responses': .*at least 2"),
    ({"prompt": "Q:", "responses": [" a", " b"], "ranks": [1]}, r"row 0, field 'ranks': expected one rank per"),
    ({"prompt": "Q:", "responses": [" a", " b"], "ranks": [1, 0]}, r"row 0, field 'ranks': expected integers >= 1"),
    ({"prompt": "Q:", "responses": [" a", " "], "ranks": [1, 2]}, r"row 0, field 'responses': empty response"),
])  # fmt: skip
def test_bad_rankings_name_row_and_field(tmp_path: Path, row: dict, message: str):
    path = tmp_path / "ranked.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(D.DatasetValidationError, match=message):
        D._normalise(D.load_table(str(path)), str(path), "preference", ALL)


def test_all_tied_rankings_say_how_to_keep_them(tmp_path: Path):
    rows = [{"prompt": "Q:", "responses": [" a", " b"], "ranks": [1, 1]}]
    with pytest.raises(D.DatasetValidationError, match=r"give no pairs.*data.rankings.ties=both"):
        D._normalise(rows, "ranked.jsonl", "preference", ALL)
    assert len(D._normalise(rows, "ranked.jsonl", "preference", RankingSettings("all", "both"))) == 2


def test_ranked_files_become_pairs_demos_and_prompts_held_out_by_ranking(tmp_path: Path):
    rows = [{"prompt": f"Q{i}:", "responses": [f" r{i}a", f" r{i}b", f" r{i}c"], "ranks": [3, 1, 2],
             "annotator": f"a{i % 2}"} for i in range(20)]  # fmt: skip
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    node = {"path": str(path), "name": None, "split": None}
    cfg = {"sft": node, "preference": node, "preference_eval": None, "prompts": None, "eval_fraction": 0.25,
           "max_samples": None, "seed": 0, "rankings": {"pairs": "all", "ties": "drop"}}  # fmt: skip
    splits = D.load_file_splits(cfg)
    assert {k: len(v) for k, v in splits.items()} == {
        "sft": 20, "preference": 45, "preference_eval": 15, "prompts": 15, "eval_prompts": 5}  # fmt: skip
    assert splits["sft"][0]["completion"] == " r0b"
    assert not set(splits["preference"]["prompt"]) & set(splits["preference_eval"]["prompt"])
    assert set(splits["prompts"]["prompt"]) == set(splits["preference"]["prompt"])  # each ranked prompt once
    assert set(splits["preference"]["annotator"]) == {"a0", "a1"}
    adjacent = D.load_file_splits({**cfg, "rankings": {"pairs": "adjacent", "ties": "drop"}})
    assert (len(adjacent["preference"]), len(adjacent["preference_eval"])) == (30, 10)


def test_rankings_settings_are_validated_with_the_config():
    cfg = compose_config(["data=files", "data.sft.path=a.jsonl", "data.preference.path=b.jsonl",
                          "data.rankings.pairs=neighbours"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"`data.rankings.pairs` = 'neighbours' is invalid: use one of all, adjacent"):
        validate_config(cfg)
