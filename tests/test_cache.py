"""Stage keys follow config, upstream keys and component source; DONE markers are atomic."""

from __future__ import annotations

from flows import cache
from flows.cache import fresh_stage_dir, module_closure, read_done, stage_key, write_done
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
    write_done(stage_dir, {"metrics": {"a": 1.0}})
    assert read_done(stage_dir) == {"metrics": {"a": 1.0}}
    assert [p.name for p in stage_dir.iterdir() if p.name.startswith(".")] == []
    fresh_stage_dir(stage_dir)  # an unfinished attempt is wiped
    assert list(stage_dir.iterdir()) == []
    assert read_done(tmp_path / "missing") is None
