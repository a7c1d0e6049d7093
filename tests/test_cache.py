"""Stage keys follow config, upstream keys and component source; DONE markers are atomic."""

from __future__ import annotations

import json

import pytest

from flows import cache
from flows.cache import (
    DamagedStage,
    DigestMemo,
    build_manifest,
    finished,
    fresh_stage_dir,
    input_digest,
    module_closure,
    read_done,
    stage_key,
    write_done,
)
from flows.stages import STAGES

STAGE_MODULES = {name: list(stage.modules) for name, stage in STAGES.items()}


def test_closure_follows_component_imports():
    ppo = module_closure(STAGE_MODULES["ppo"])
    assert {"components.ppo", "components.generation", "components.modeling"} <= ppo
    assert "components.ppo" not in module_closure(STAGE_MODULES["sft"])
    assert "components.ppo" not in module_closure(STAGE_MODULES["reward"])


def test_editing_ppo_source_changes_only_ppo_key(monkeypatch):
    keys = {s: stage_key(s, {"x": 1}, {}, mods) for s, mods in STAGE_MODULES.items()}
    real = cache.read_source
    monkeypatch.setattr(cache, "read_source",
                        lambda m: real(m) + (b"\n# edited" if m == "components.ppo" else b""))
    edited = {s: stage_key(s, {"x": 1}, {}, mods) for s, mods in STAGE_MODULES.items()}
    assert edited["ppo"] != keys["ppo"]
    assert {s for s in keys if edited[s] != keys[s]} == {"ppo"}


def test_key_changes_with_config_and_upstream_only():
    mods = STAGE_MODULES["sft"]
    base = stage_key("sft", {"lr": 1e-3, "n": 2}, {"data": "abc"}, mods)
    assert base == stage_key("sft", {"n": 2, "lr": 1e-3}, {"data": "abc"}, mods)  # order-independent
    assert base != stage_key("sft", {"lr": 2e-3, "n": 2}, {"data": "abc"}, mods)
    assert base != stage_key("sft", {"lr": 1e-3, "n": 2}, {"data": "abd"}, mods)
    assert base != stage_key("reward", {"lr": 1e-3, "n": 2}, {"data": "abc"}, mods)


def test_done_marker_roundtrip_and_fresh_dir(tmp_path):
    stage_dir = fresh_stage_dir(tmp_path / "sft" / "k")
    assert read_done(stage_dir) is None
    (stage_dir / "partial.bin").write_text("half-written")
    result = {"metrics": {"a": 1.0}, "manifest": build_manifest(stage_dir)}
    write_done(stage_dir, result)
    assert read_done(stage_dir) == result
    assert [p.name for p in stage_dir.iterdir() if p.name.startswith(".")] == []
    fresh_stage_dir(stage_dir)  # an unfinished attempt is wiped
    assert list(stage_dir.iterdir()) == []
    assert read_done(tmp_path / "missing") is None


def _finished_stage(tmp_path):
    stage_dir = fresh_stage_dir(tmp_path / "reward" / "k")
    (stage_dir / "model").mkdir()
    (stage_dir / "model" / "model.safetensors").write_bytes(b"weights" * 100)
    (stage_dir / "trainer").mkdir()
    (stage_dir / "trainer" / "scratch.txt").write_text("not an output")
    write_done(stage_dir, {"metrics": {}, "manifest": build_manifest(stage_dir)})
    return stage_dir


def test_manifest_lists_outputs_and_digest_follows_content(tmp_path):
    stage_dir = _finished_stage(tmp_path)
    manifest = read_done(stage_dir)["manifest"]
    assert list(manifest["files"]) == ["model/model.safetensors"]  # scratch, marker and dotfiles are not outputs
    assert manifest["files"]["model/model.safetensors"]["size"] == 700
    (stage_dir / "model" / "model.safetensors").write_bytes(b"WEIGHTS" * 100)
    assert build_manifest(stage_dir)["digest"] != manifest["digest"]


def test_damaged_outputs_are_named_and_rebuilt(tmp_path, caplog):
    stage_dir = _finished_stage(tmp_path)
    weights = stage_dir / "model" / "model.safetensors"
    weights.write_bytes(b"")  # truncated to 0 bytes
    with pytest.raises(DamagedStage, match="model.safetensors has 0 bytes, 700 were written"):
        read_done(stage_dir)
    assert finished("reward", stage_dir, "sizes") is None  # treated as unfinished: the stage is rebuilt
    assert "[reward] stored result is damaged" in caplog.text and "model.safetensors" in caplog.text
    weights.write_bytes(b"X" * 700)  # same size, other bytes: only a full check sees it
    assert read_done(stage_dir, "sizes") is not None
    with pytest.raises(DamagedStage, match="sha256 differs"):
        read_done(stage_dir, "hashes")
    weights.unlink()
    with pytest.raises(DamagedStage, match="is missing"):
        read_done(stage_dir)


@pytest.mark.parametrize("marker", ["{not json", "", json.dumps({"metrics": {}})])
def test_unreadable_marker_names_the_file(tmp_path, marker):
    stage_dir = _finished_stage(tmp_path)
    (stage_dir / "DONE").write_text(marker)
    with pytest.raises(DamagedStage, match=r"DONE is unreadable"):
        read_done(stage_dir)
    assert finished("reward", stage_dir, "sizes") is None


def test_input_digest_follows_file_bytes_not_name(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    memo = DigestMemo(tmp_path / "memo.json")
    first = input_digest(str(data), memo)
    assert first == input_digest(str(data))  # the memo gives the same answer as hashing
    data.write_text('{"prompt": "a", "chosen": "c", "rejected": "b"}\n')  # edited in place, same size
    assert input_digest(str(data), memo) != first
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = input_digest(str(folder))
    (folder / "config.json").write_text("{ }")
    assert input_digest(str(folder)) != before
    assert input_digest("some-org/some-model").startswith("hub:")  # offline in tests: the id stands for itself
