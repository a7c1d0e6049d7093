"""Terminal progress for long stages (step/total, ETA, key metric) and the end-of-run summary table.

In a terminal each stage gets a live progress bar (rich); elsewhere (CI, a log file, Prefect's logs) the same
numbers arrive as a plain log line every few seconds and one at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from flows.tracking import log_metrics

log = logging.getLogger("alignflow")


class StageLogger:
    """`on_log(step, metrics)` for a stage: logs the numbers to its MLflow run and prints progress with an ETA."""

    def __init__(self, stage: str, run_id: str, total: int | None, key_metric: str, every_s: float = 5.0,
                 zero_based: bool = False) -> None:
        self.stage, self.run_id, self.total, self.key_metric = stage, run_id, total, key_metric
        self.offset = 1 if zero_based else 0  # our PPO counts updates from 0; HF trainers count steps from 1
        self.every_s = every_s
        self.start = time.monotonic()
        self.last_print = float("-inf")  # the first step is reported at once
        self.bar = LiveBar(stage) if sys.stderr.isatty() else None

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        total = int(metrics.pop(f"{self.stage}/total_steps", 0) or self.total or 0)
        log_metrics(self.run_id, metrics, step)
        step += self.offset
        now = time.monotonic()
        done = step >= total > 0
        value = metrics.get(self.key_metric)
        if self.bar is not None:
            self.bar.update(step, total, f"{self.key_metric}={value:.4f}" if value is not None else "", done)
            return
        if now - self.last_print < self.every_s and not done:
            return
        self.last_print = now
        elapsed = now - self.start
        eta = f"eta {elapsed / step * (total - step):5.0f}s" if step and total else ""
        shown = f"{self.key_metric}={value:.4f}" if value is not None else ""
        of_total = f"/{total} ({100 * step / total:3.0f}%)" if total else ""
        log.info("[%s] step %d%s %s %s elapsed %.0fs", self.stage, step, of_total, shown, eta, elapsed)


class LiveBar:
    """A rich progress bar for one stage: steps, percentage, elapsed, ETA and the key metric, redrawn in place."""

    def __init__(self, stage: str) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[shown]}"), transient=False)
        self.task = self.progress.add_task(stage, total=None, shown="")
        self.started = False

    def update(self, step: int, total: int, shown: str, done: bool) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        self.progress.update(self.task, completed=step, total=total or None, shown=shown)
        if done:
            self.progress.stop()


def summary_table(results: list[dict[str, Any]], headline: dict[str, list[str]]) -> str:
    """A plain-text table: one row per stage with cache status, time and its headline metrics."""
    rows = [("stage", "cached", "seconds", "key", "metrics")]
    for r in results:
        names = headline.get(r["stage"], [])
        shown = "  ".join(f"{n}={r['metrics'][n]:.4g}" for n in names if n in r["metrics"])
        rows.append((r["stage"], "yes" if r["cached"] else "no", f"{r['seconds']:.1f}", r["key"][:10], shown))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in rows]
    return "\n".join([lines[0], "-" * max(len(line) for line in lines), *lines[1:]])


class PeakMemory:
    """The peak resident memory of this process while a block runs, sampled from /proc/self/statm every `every_s`
    (`peak_gib` after the block): what a stage needs, so a user can size a machine for it. Processes a stage
    launches (`accelerate launch`) are not counted."""

    def __init__(self, every_s: float = 0.1) -> None:
        import threading

        self.every_s, self.peak_gib = every_s, resident_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_gib = max(self.peak_gib, resident_gib())

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_gib = max(self.peak_gib, resident_gib())


def resident_gib() -> float:
    """This process's resident memory in GiB (0 where /proc is missing)."""
    import os

    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
