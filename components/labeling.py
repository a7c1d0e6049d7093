"""RLAIF feedback: sample response pairs from the SFT model, have an AI judge label them, and summarise the labels.

Labelling is resumable: every verdict is appended to a JSONL cache as soon as its batch is judged, keyed by
sha256(judge fingerprint, prompt, a, b). A rerun (after a crash, a timeout, an API outage) asks the judge only for
pairs not in the cache, and a changed judge (another model, constitution or setting) has another fingerprint,
so it never reuses a different judge's verdicts. A truncated last line (a crash mid-write) is dropped on load, and
a lock file next to the cache serialises processes that share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from components.hooks import GoldFn, StepLogger
from components.judges.base import Judge, JudgeError, Verdict
from components.settings import SamplingSettings

logger = logging.getLogger(__name__)

def sample_pairs(model_path: str, prompts: list[str], settings: SamplingSettings, device: str) -> list[dict[str, str]]:
    """Two completions per prompt from the SFT model, with two different sampling seeds; identical pairs dropped.

    Rows are `{prompt, response_a, response_b}`. The seeds are 2*seed and 2*seed + 1, so runs with different
    seeds never share a sample stream. `device` is where the model samples (a torch device string).
    """
    from components.generation import sample
    from components.modeling import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path).to(device).eval()
    first, second = (
        sample(model, tokenizer, prompts, settings, seed=s).texts for s in (2 * settings.seed, 2 * settings.seed + 1)
    )
    rows = [
        {"prompt": p, "response_a": a, "response_b": b}
        for p, a, b in zip(prompts, first, second, strict=True)
        if a != b
    ]
    logger.info("sampled %d pairs (%d identical dropped)", len(rows), len(prompts) - len(rows))
    return rows


def pair_key(fingerprint: str, prompt: str, a: str, b: str) -> str:
    """Cache key of one judged pair: sha256 over the judge's fingerprint and the exact texts, in order."""
    return hashlib.sha256(json.dumps([fingerprint, prompt, a, b]).encode()).hexdigest()


@contextlib.contextmanager
def cache_lock(cache_path: Path) -> Iterator[None]:
    """Exclusive lock on a sidecar `<cache>.lock` file: processes sharing one judge's cache (parallel stages or
    sweep jobs) never read a line another is still writing, nor interleave their appends."""
    with cache_path.with_name(cache_path.name + ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_cache(cache_path: Path) -> dict[str, Verdict]:
    """Verdicts already in a JSONL cache; a truncated trailing line is cut off the file, bad lines are skipped.

    Call it under `cache_lock` when other processes may be writing (as `label_pairs` does).
    """
    if not cache_path.is_file():
        return {}
    data = cache_path.read_bytes()
    if data and not data.endswith(b"\n"):  # crashed mid-write: cut the partial line so appends start clean
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: dropping a truncated last line (%d bytes)", cache_path, len(data) - keep)
        with cache_path.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    cache: dict[str, Verdict] = {}
    for number, line in enumerate(data.decode().splitlines(), start=1):
        try:
            record = json.loads(line)
            cache[record["key"]] = Verdict.from_dict(record["verdict"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d: unreadable cache line skipped", cache_path, number)
    return cache


def _append(cache_path: Path, records: list[dict[str, Any]]) -> None:
    """Append records as JSON lines (under the cache lock) and force them to disk before the next batch is asked."""
    with cache_lock(cache_path), cache_path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def label_pairs(
    judge: Judge, pairs: list[dict[str, str]], cache_path: Path, batch_size: int,
    on_log: StepLogger | None = None,
) -> list[Verdict]:
    """One verdict per pair, asking the judge only for pairs missing from the cache, `batch_size` at a time.

    `on_log(pairs_asked, metrics)` reports progress after each batch (`label/total_steps` = pairs to ask).
    Each judged batch is appended to `cache_path` before the next is asked. If the judge fails, the exception
    propagates (a `JudgeError` re-raised with the index into `pairs`) and the cache keeps every earlier batch.
    """
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = judge.fingerprint()
    keys = [pair_key(fingerprint, r["prompt"], r["response_a"], r["response_b"]) for r in pairs]
    with cache_lock(cache_path):
        cache = read_cache(cache_path)
    todo, seen = [], set(cache)
    for i, key in enumerate(keys):  # each missing pair once, even if it occurs twice in `pairs`
        if key not in seen:
            seen.add(key)
            todo.append(i)
    logger.info("labelling %d pairs: %d cached, %d to ask", len(pairs), len(pairs) - len(todo), len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        rows = [pairs[i] for i in batch]
        try:
            verdicts = judge.judge(
                [r["prompt"] for r in rows], [r["response_a"] for r in rows], [r["response_b"] for r in rows]
            )
        except JudgeError as exc:
            raise JudgeError(exc.judge, batch[exc.index], exc.problem) from exc
        if len(verdicts) != len(rows):
            raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(rows)} pairs")
        _append(cache_path, [{"key": keys[i], "verdict": v.to_dict()} for i, v in zip(batch, verdicts, strict=True)])
        cache.update((keys[i], v) for i, v in zip(batch, verdicts, strict=True))
        if on_log is not None:
            asked = start + len(batch)
            on_log(asked, {"label/total_steps": float(len(todo)), "label/pairs_asked": float(asked)})
    return [cache[k] for k in keys]


def to_preferences(pairs: Sequence[dict[str, str]], verdicts: Sequence[Verdict]) -> list[dict[str, str]]:
    """`{prompt, chosen, rejected}` rows in TRL's preference format; ties (preference 0.5) are dropped."""
    rows = []
    for pair, verdict in zip(pairs, verdicts, strict=True):
        if verdict.preference == 0.5:
            continue
        a_wins = verdict.preference > 0.5
        chosen, rejected = (
            (pair["response_a"], pair["response_b"]) if a_wins else (pair["response_b"], pair["response_a"])
        )
        rows.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
    return rows


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _gold_agreement(pairs: Sequence[dict[str, str]], verdicts: Sequence[Verdict], gold_fn: GoldFn) -> dict[str, float]:
    """Share of non-tied verdicts that order the pair as the gold reward does (gold ties are left out)."""
    decided = [(p, v) for p, v in zip(pairs, verdicts, strict=True) if v.preference != 0.5]
    prompts = [p["prompt"] for p, _ in decided]
    gold_a = gold_fn(prompts, [p["response_a"] for p, _ in decided])
    gold_b = gold_fn(prompts, [p["response_b"] for p, _ in decided])
    hits = [
        (v.preference > 0.5) == (ga > gb) for (_, v), ga, gb in zip(decided, gold_a, gold_b, strict=True) if ga != gb
    ]
    return {"label/agreement_with_gold": sum(hits) / len(hits)} if hits else {}


def label_stats(
    pairs: Sequence[dict[str, str]], verdicts: Sequence[Verdict], gold_fn: GoldFn | None
) -> dict[str, float]:
    """Label summary for logging: counts, tie and position-bias rates, per-principle score mean/std, gold agreement.

    `gold_fn` maps (prompts, completions) to gold rewards (the embedded task's `gold_rewards`), or None for real data.
    A rate whose denominator is empty (no two-order verdicts, no decided pairs) is left out rather than faked.
    """
    if len(pairs) != len(verdicts):
        raise ValueError(f"{len(pairs)} pairs but {len(verdicts)} verdicts")
    n = len(verdicts)
    ties = sum(v.preference == 0.5 for v in verdicts)
    stats = {"label/n_pairs": float(n), "label/n_labelled": float(n - ties)}
    if n:
        stats["label/tie_rate"] = ties / n
    both_orders = [v.position_consistent for v in verdicts if v.position_consistent is not None]
    if both_orders:
        stats["label/position_bias_rate"] = sum(not c for c in both_orders) / len(both_orders)
    per_principle: dict[str, list[float]] = {}
    for v in verdicts:
        for scores in (v.scores_a or {}, v.scores_b or {}):
            for name, value in scores.items():
                per_principle.setdefault(name, []).append(float(value))
    for name, values in per_principle.items():
        stats[f"label/principle/{name}_mean"], stats[f"label/principle/{name}_std"] = _mean_std(values)
    if gold_fn is not None:
        stats.update(_gold_agreement(pairs, verdicts, gold_fn))
    return stats
