"""Rankings of K responses per prompt (what human annotators produce) turned into preference pairs and demos.

A ranking row holds `prompt`, `responses` (K ≥ 2 strings, or K conversations' final answers as message lists) and
`ranks` (K integers, 1 = best; equal ranks are ties), optionally `annotator`. Pairs are every K(K−1)/2 pair or only
neighbours in rank order (`RankingSettings.pairs`); a tie makes no pair, or both orders (`ties: both`), which pulls
the two rewards together under a Bradley–Terry loss. The annotator id travels with each pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import combinations
from typing import Any

RANKING_FIELDS = ("prompt", "responses", "ranks")
PAIRINGS = ("all", "adjacent")
TIES = ("drop", "both")


@dataclass(frozen=True)
class RankingSettings:
    """How rankings become pairs: `pairs` all | adjacent; `ties` drop | both."""

    pairs: str
    ties: str

    def __post_init__(self) -> None:
        """Refuse unknown values, naming the field and the choices."""
        if self.pairs not in PAIRINGS:
            raise ValueError(f"pairs = {self.pairs!r} is invalid: use one of {', '.join(PAIRINGS)}")
        if self.ties not in TIES:
            raise ValueError(f"ties = {self.ties!r} is invalid: use one of {', '.join(TIES)}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RankingSettings:
        """The settings from a config node with these keys."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})


def is_ranking(columns: Iterable[str]) -> bool:
    """True when a table's columns are the ranking format's."""
    return set(RANKING_FIELDS) <= set(columns)


def ranked_pairs(ranks: Sequence[int], settings: RankingSettings) -> list[tuple[int, int]]:
    """(better, worse) response indices from `ranks` (1 = best); ties as `settings.ties` says."""
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    candidates = zip(order, order[1:], strict=False) if settings.pairs == "adjacent" else combinations(order, 2)
    pairs: list[tuple[int, int]] = []
    for better, worse in candidates:
        if ranks[better] != ranks[worse]:
            pairs.append((better, worse))
        elif settings.ties == "both":
            pairs += [(better, worse), (worse, better)]
    return pairs


def check_ranking(row: Mapping[str, Any], where: str) -> None:
    """One ranking row: K ≥ 2 non-empty responses and as many integer ranks; the message names row and fix."""
    responses, ranks = row.get("responses"), row.get("ranks")
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError(f"{where}, field 'responses': expected a list of at least 2 responses")
    if any(r is None or (isinstance(r, str) and not r.strip()) for r in responses):
        raise ValueError(f"{where}, field 'responses': empty response; drop it with its rank")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise ValueError(f"{where}, field 'ranks': expected one rank per response ({len(responses)}), "
                         f"got {ranks!r:.60}")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"{where}, field 'ranks': expected integers >= 1 (1 = best), got {ranks!r:.60}")


def rankings_to_pairs(rows: Sequence[Mapping[str, Any]], settings: RankingSettings, source: str) -> list[dict]:
    """Explicit preference pairs (`prompt`, `chosen`, `rejected`, and `annotator` when the rows have one)."""
    pairs = []
    for i, row in enumerate(rows):
        check_ranking(row, f"{source}: row {i}")
        extra = {"annotator": str(row["annotator"])} if row.get("annotator") is not None else {}
        for better, worse in ranked_pairs(row["ranks"], settings):
            pairs.append({"prompt": row["prompt"], "chosen": row["responses"][better],
                          "rejected": row["responses"][worse], **extra})  # fmt: skip
    return pairs


def best_responses(rows: Sequence[Mapping[str, Any]], source: str) -> list[dict]:
    """Demonstrations: each prompt with its best-ranked response (the first of a tie), as prompt/completion."""
    demos = []
    for i, row in enumerate(rows):
        check_ranking(row, f"{source}: row {i}")
        best = min(range(len(row["ranks"])), key=lambda k: (row["ranks"][k], k))
        demos.append({"prompt": row["prompt"], "completion": row["responses"][best]})
    return demos
