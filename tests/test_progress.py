"""Stage progress: a live bar in a terminal, plain log lines elsewhere; the numbers reach tracking either way."""

from __future__ import annotations

import logging

import pytest

from flows import progress


@pytest.fixture
def logged(monkeypatch):
    sent: list[tuple] = []
    monkeypatch.setattr(progress, "log_metrics", lambda run_id, metrics, step: sent.append((step, dict(metrics))))
    return sent


def test_plain_lines_when_not_a_terminal(monkeypatch, logged, caplog):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="alignflow")
    logger = progress.StageLogger("ppo", "run", 4, "ppo/mean_reward", every_s=3600, zero_based=True)
    for step in range(4):
        logger(step, {"ppo/mean_reward": float(step)})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # the first step at once, then none until the last (every_s is an hour)
    assert lines[0].startswith("[ppo] step 1/4 ( 25%)")
    assert lines[-1].startswith("[ppo] step 4/4 (100%) ppo/mean_reward=3.0000")
    assert [s for s, _ in logged] == [0, 1, 2, 3]  # every step still reaches tracking


def test_a_live_bar_in_a_terminal(monkeypatch, logged, caplog):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    caplog.set_level(logging.INFO, logger="alignflow")
    logger = progress.StageLogger("sft", "run", None, "sft/loss")
    for step in (10, 20, 30):
        logger(step, {"sft/loss": 1.0 / step, "sft/total_steps": 30.0})
    task = logger.bar.progress.tasks[0]
    assert (task.completed, task.total, task.fields["shown"]) == (30, 30, "sft/loss=0.0333")
    assert task.finished and not logger.bar.progress.live.is_started  # stopped at the last step
    assert not caplog.records  # no duplicate log lines under the bar
    assert all("sft/total_steps" not in m for _, m in logged)
