"""RLAIF labelling: pair sampling from a tiny model, the resumable verdict cache, preference rows, label stats,
and the judge configs in conf/judge/ against the settings each judge accepts."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from components.generation import SamplingSettings
from components.judges.base import JudgeError, Verdict, parse_principles, settings_from
from components.judges.constitution import ConstitutionSettings
from components.judges.llm import LLMSettings
from components.judges.openai_compatible import HTTPSettings
from components.judges.reward_model import RewardModelSettings
from components.labeling import label_pairs, label_stats, pair_key, read_cache, sample_pairs, to_preferences
from components.modeling import build_base_checkpoint

CONF = Path(__file__).resolve().parents[1] / "conf"
SETTINGS = {
    "constitution": ConstitutionSettings,
    "llm": LLMSettings,
    "openai_compatible": HTTPSettings,
    "reward_model": RewardModelSettings,
}


class LengthJudge:
    """A deterministic stand-in judge: the longer response wins (equal lengths tie); records every call and can
    be told to fail on a given call, as an API outage would."""

    def __init__(self, name: str, fail_on_call: int | None = None, fail_index: int = 0) -> None:
        self.name, self.fail_on_call, self.fail_index, self.calls = name, fail_on_call, fail_index, []

    def judge(self, prompts: list[str], a: list[str], b: list[str]) -> list[Verdict]:
        self.calls.append(list(zip(prompts, a, b, strict=True)))
        if self.fail_on_call == len(self.calls):
            raise JudgeError(self.name, self.fail_index, "HTTP 503 (after 3 attempts)")
        return [
            Verdict(
                1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5,
                scores_a={"length": float(len(x))},
                scores_b={"length": float(len(y))},
            )
            for x, y in zip(a, b, strict=True)
        ]

    def fingerprint(self) -> str:
        return f"length-{self.name}"


def make_pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Review of item {i}:",
            "response_a": " x" * rng.randint(1, 9),
            "response_b": " y" * rng.randint(1, 9),
        }
        for i in range(n)
    ]


def asked(judge: LengthJudge) -> int:
    return sum(len(call) for call in judge.calls)


# ------------------------------------------------------------------------------------------- resumable cache
def test_label_pairs_resumes_after_a_failure(tmp_path):
    pairs, cache = make_pairs(10, 0), tmp_path / "verdicts.jsonl"
    failing = LengthJudge("j", fail_on_call=3, fail_index=1)
    with pytest.raises(JudgeError) as caught:
        label_pairs(failing, pairs, cache, batch_size=4)
    assert caught.value.index == 8 + 1  # re-raised with the index into `pairs`, not into the failed batch
    assert len(read_cache(cache)) == 8  # the two batches judged before the outage are on disk
    rerun = LengthJudge("j")
    verdicts = label_pairs(rerun, pairs, cache, batch_size=4)
    assert asked(rerun) == 2 and [p for p, _, _ in rerun.calls[0]] == ["Review of item 8:", "Review of item 9:"]
    fresh = LengthJudge("j")
    assert label_pairs(fresh, pairs, tmp_path / "fresh.jsonl", batch_size=4) == verdicts
    again = LengthJudge("j")
    assert label_pairs(again, pairs, cache, batch_size=4) == verdicts and asked(again) == 0


def test_cache_is_keyed_by_judge_and_texts(tmp_path):
    pairs, cache = make_pairs(5, 1), tmp_path / "verdicts.jsonl"
    label_pairs(LengthJudge("one"), pairs, cache, batch_size=8)
    other = LengthJudge("two")  # another fingerprint: nothing reused
    label_pairs(other, pairs, cache, batch_size=8)
    assert asked(other) == 5
    swapped = [{**p, "response_a": p["response_b"], "response_b": p["response_a"]} for p in pairs]
    judge = LengthJudge("one")
    assert [v.preference for v in label_pairs(judge, swapped, cache, batch_size=8)] == [
        v.preference
        for v in LengthJudge("x").judge(
            [p["prompt"] for p in swapped], [p["response_a"] for p in swapped], [p["response_b"] for p in swapped]
        )
    ]
    assert asked(judge) == 5  # order matters: (b, a) is a different question from (a, b)
    assert pair_key("f", "p", "a", "b") != pair_key("f", "p", "b", "a") != pair_key("g", "p", "a", "b")


def test_duplicate_pairs_are_asked_once(tmp_path):
    pairs = make_pairs(3, 2) * 2
    judge = LengthJudge("d")
    verdicts = label_pairs(judge, pairs, tmp_path / "c.jsonl", batch_size=2)
    assert asked(judge) == 3 and verdicts[:3] == verdicts[3:]


def test_truncated_last_line_is_tolerated(tmp_path):
    pairs, cache = make_pairs(6, 3), tmp_path / "verdicts.jsonl"
    expected = label_pairs(LengthJudge("t"), pairs[:4], cache, batch_size=2)
    with cache.open("a") as handle:
        handle.write('{"key": "abc", "verdict": {"prefer')  # a crash mid-write
    judge = LengthJudge("t")
    verdicts = label_pairs(judge, pairs, cache, batch_size=2)
    assert verdicts[:4] == expected and asked(judge) == 2
    lines = cache.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["key"] for line in lines)  # appends start on a clean line
    assert label_pairs(LengthJudge("t"), pairs, cache, batch_size=2) == verdicts


def test_a_corrupt_middle_line_is_skipped(tmp_path):
    pairs, cache = make_pairs(4, 4), tmp_path / "verdicts.jsonl"
    label_pairs(LengthJudge("m"), pairs, cache, batch_size=4)
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    judge = LengthJudge("m")
    label_pairs(judge, pairs, cache, batch_size=4)
    assert asked(judge) == 0


def test_parallel_labellers_share_one_cache_file(tmp_path):
    class Wordy(LengthJudge):
        """Verdicts with a 20 kB raw text: each line takes several write calls, which could interleave unlocked."""

        def judge(self, prompts, a, b):
            time.sleep(0.002)
            return [dataclasses.replace(v, raw="r" * 20_000) for v in super().judge(prompts, a, b)]

    groups = [[{**p, "prompt": f"{seed} {p['prompt']}"} for p in make_pairs(30, seed)] for seed in range(4)]
    cache = tmp_path / "shared.jsonl"
    threads = [threading.Thread(target=label_pairs, args=(Wordy("w"), g, cache, 1)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = cache.read_text().splitlines()
    assert len(lines) == 120 and all(len(json.loads(line)["verdict"]["raw"]) == 20_000 for line in lines)
    again = Wordy("w")
    label_pairs(again, [p for g in groups for p in g], cache, 8)
    assert asked(again) == 0


# -------------------------------------------------------------------------------------- preferences & stats
def test_to_preferences_orients_rows_and_drops_ties():
    pairs = [{"prompt": p, "response_a": f"a{i}", "response_b": f"b{i}"} for i, p in enumerate("pqr", start=1)]
    rows = to_preferences(pairs, [Verdict(1.0), Verdict(0.0), Verdict(0.5)])
    assert rows == [
        {"prompt": "p", "chosen": "a1", "rejected": "b1"},
        {"prompt": "q", "chosen": "b2", "rejected": "a2"},
    ]


def test_label_stats_by_hand():
    pairs = [
        {"prompt": "p", "response_a": a, "response_b": b}
        for a, b in [("long text", "x"), ("x", "long text"), ("ab", "cd"), ("abc", "a"), ("same", "same")]
    ]
    verdicts = [
        Verdict(1.0, {"h": 1.0}, {"h": 0.0}, position_consistent=True),  # agrees with gold (longer is better)
        Verdict(1.0, {"h": 2.0}, {"h": 1.0}, position_consistent=True),  # disagrees
        Verdict(0.5, {"h": 0.0}, {"h": 0.0}, position_consistent=False),  # tie: not counted for agreement
        Verdict(0.0, {"h": 3.0}, {"h": 4.0}, position_consistent=None),  # disagrees (asked once)
        Verdict(1.0, {"h": 1.0}, {"h": 2.0}, position_consistent=True),  # gold tie: left out of agreement
    ]
    stats = label_stats(pairs, verdicts, lambda prompts, texts: [float(len(t)) for t in texts])
    scores = [1.0, 0.0, 2.0, 1.0, 0.0, 0.0, 3.0, 4.0, 1.0, 2.0]
    mean = sum(scores) / len(scores)
    assert stats["label/agreement_with_gold"] == pytest.approx(1 / 3)
    assert stats["label/position_bias_rate"] == pytest.approx(1 / 4)
    assert stats["label/tie_rate"] == pytest.approx(1 / 5)
    assert stats["label/n_pairs"] == 5.0 and stats["label/n_labelled"] == 4.0
    assert stats["label/principle/h_mean"] == pytest.approx(mean)
    assert stats["label/principle/h_std"] == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in scores) / 10))
    no_gold = label_stats(pairs[:1], [Verdict(1.0)], None)
    assert "label/agreement_with_gold" not in no_gold and "label/position_bias_rate" not in no_gold
    assert all(isinstance(v, float) for v in stats.values())


# ------------------------------------------------------------------------------------------- pair sampling
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    rng = random.Random(0)
    words = "the screen battery lid is good bad great broken very quite nice".split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    arch = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
    return build_base_checkpoint(corpus, arch, vocab_size=100, seed=0, out_dir=tmp_path_factory.mktemp("lm"))




def test_sample_pairs_draws_two_different_completions(tiny_lm, one_thread):
    prompts = [f"the {w}" for w in ("screen", "battery", "lid", "screen", "lid", "battery")]
    rows = sample_pairs(tiny_lm, prompts, SamplingSettings(8, 1.0, 4, 0), "cpu")
    assert 0 < len(rows) <= len(prompts) and all(r["response_a"] != r["response_b"] for r in rows)
    assert set(rows[0]) == {"prompt", "response_a", "response_b"} and {r["prompt"] for r in rows} <= set(prompts)
    assert sample_pairs(tiny_lm, prompts, SamplingSettings(8, 1.0, 4, 0), "cpu") == rows  # reproducible from the seed
    assert sample_pairs(tiny_lm, prompts, SamplingSettings(8, 1.0, 4, 1), "cpu") != rows
    # near-greedy sampling gives both seeds the same text: such pairs carry no preference and are dropped
    assert sample_pairs(tiny_lm, prompts, SamplingSettings(8, 1e-4, 4, 0), "cpu") == []


# ------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_judge_configs_match_the_judges(kind):
    root = OmegaConf.create(
        {
            "device": "cpu",
            "seed": 0,
            "rl": {"max_new_tokens": 32},
            "constitution": OmegaConf.load(CONF / "constitution" / "default.yaml"),
            "judge": OmegaConf.load(CONF / "judge" / f"{kind}.yaml"),
        }
    )
    if kind == "reward_model":
        root.judge.settings.path = "/some/reward/model"  # required (???) in the YAML
    cfg = OmegaConf.to_container(root, resolve=True)["judge"]
    assert cfg["kind"] == kind and parse_principles(cfg["principles"])
    settings_from(SETTINGS[kind], kind, cfg["settings"])  # every key known, none missing
    assert set(cfg) == {"kind", "principles", "settings"}  # sampling and batching belong to conf/label


def test_label_config_holds_sampling_and_batching():
    root = OmegaConf.create(
        {"seed": 0, "rl": {"max_new_tokens": 32}, "label": OmegaConf.load(CONF / "label" / "default.yaml")}
    )
    cfg = OmegaConf.to_container(root, resolve=True)["label"]
    assert set(cfg) == {"batch_size", "sampling"}
    assert set(cfg["sampling"]) == {"n_pairs", "max_new_tokens", "temperature", "batch_size", "seed"}
    assert isinstance(cfg["batch_size"], int) and cfg["batch_size"] > 0 and cfg["sampling"]["n_pairs"] > 0
    assert SamplingSettings.from_config(cfg["sampling"]).max_new_tokens == 32
    defaults = OmegaConf.load(CONF / "config.yaml").defaults
    groups = [next(iter(d)) if not isinstance(d, str) else d for d in defaults]
    assert groups.index("label") == groups.index("judge") - 1
