"""Simulated annotators for the embedded review task: profiles that value different things and rank with noise.

A profile's utility reweights the gold reward's parts (components/review_task.py `gold_terms`): how much it cares
for sentiment, how much each penalty hurts, and a cost per word (concision). It ranks K responses by drawing an
order from the Plackett–Luce model at its `temperature` (softmax over utility / temperature, best first, without
replacement): 0 ranks by utility exactly, larger values rank more at random. Each profile's gold is its utility,
so a policy can be judged per profile, and profiles that disagree show how serving one group costs another.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from components.review_task import RandomSource, bayes_ceiling, gold_terms, words_of

TERMS = ("sentiment", "length_penalty", "repetition_penalty", "stuffing_penalty")
#: Profile names go into metric names (`eval/gold_win_rate_vs_sft/<name>`): letters, digits, `_` and `-` only.
PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class AnnotatorProfile:
    """What one group of annotators values: a weight per gold term (penalties are subtracted), a cost per word,
    and the noise of its rankings."""

    name: str
    weights: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(TERMS, 1.0))
    per_word: float = 0.0  # utility lost per word (> 0: prefers shorter answers)
    temperature: float = 0.2  # Plackett–Luce noise; 0: always the utility order

    def __post_init__(self) -> None:
        """Refuse unknown terms and negative noise, naming the field."""
        unknown = set(self.weights) - set(TERMS)
        if unknown:
            raise ValueError(f"weights = {dict(self.weights)} is invalid: unknown terms {sorted(unknown)}; use "
                             f"{', '.join(TERMS)}")
        if self.temperature < 0 or self.per_word < 0:
            raise ValueError(f"temperature = {self.temperature} / per_word = {self.per_word} is invalid: use >= 0")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AnnotatorProfile:
        """A profile from a config node (any subset of the fields; `name` required)."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})

    def utility(self, text: str) -> float:
        """How much this profile likes a completion: its gold."""
        terms = gold_terms(text)
        value = sum(self.weights.get(t, 0.0) * terms[t] * (1 if t == "sentiment" else -1) for t in TERMS)
        return value - self.per_word * len(words_of(text))

    def rank(self, responses: Sequence[str], rng: RandomSource) -> list[int]:
        """Ranks of `responses` (1 = best) drawn from the Plackett–Luce model at this profile's temperature."""
        utilities = [self.utility(r) for r in responses]
        remaining, order = list(range(len(responses))), []
        while remaining:
            order.append(remaining.pop(_draw(utilities, remaining, self.temperature, rng)))
        ranks = [0] * len(responses)
        for place, index in enumerate(order, start=1):
            ranks[index] = place
        return ranks


def _draw(utilities: Sequence[float], remaining: Sequence[int], temperature: float, rng: RandomSource) -> int:
    """Position in `remaining` of the next response placed: the best one at temperature 0, else softmax-drawn."""
    values = [utilities[i] for i in remaining]
    if temperature == 0:
        return max(range(len(values)), key=lambda k: (values[k], -k))
    top = max(values)
    weights = [math.exp((v - top) / temperature) for v in values]
    threshold, running = rng.random() * sum(weights), 0.0
    for k, weight in enumerate(weights):
        running += weight
        if threshold < running:
            return k
    return len(weights) - 1


def disagreement(profiles: Sequence[AnnotatorProfile], texts_a: Sequence[str], texts_b: Sequence[str]) -> float:
    """Share of pairs (a_i, b_i) on which the noiseless profiles do not all prefer the same side: 0 when every
    profile agrees everywhere; how much serving one group can cost another."""
    split = 0
    for a, b in zip(texts_a, texts_b, strict=True):
        votes = {p.utility(a) > p.utility(b) for p in profiles}
        split += len(votes) > 1
    return split / max(1, len(texts_a))


def profiles_from_config(nodes: Sequence[Mapping[str, Any]]) -> list[AnnotatorProfile]:
    """Profiles from config nodes (`data.embedded.annotators`: name, weights, per_word, temperature; other keys such
    as `share` are the data's), refusing a name that cannot be part of a metric name or that two profiles share."""
    profiles = [AnnotatorProfile.from_config(node) for node in nodes]
    names = [p.name for p in profiles]
    bad = [n for n in names if not isinstance(n, str) or PROFILE_NAME.fullmatch(n) is None]
    if bad:
        raise ValueError(f"name = {bad[0]!r} is invalid: use letters, digits, _ and - only (it names metrics)")
    if len(set(names)) != len(names):
        raise ValueError(f"name = {names} is invalid: give every profile its own name")
    return profiles


def metric_suffix(name: str) -> str:
    """An annotator id as the last part of a metric name (any id a file may hold: other characters become _)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(name)) or "_"


def profile_pair_stats(rows: Sequence[Mapping[str, Any]], profiles: Sequence[AnnotatorProfile],
                       prefix: str) -> dict[str, float]:
    """Numbers of pairs labelled by `profiles` (rows with `annotator`, `utility_chosen`, `utility_rejected`):
    each profile's share and Bayes ceiling (its own utility and noise), the overall ceiling (what a model that knows
    the annotator can reach) and the share of pairs on which the noiseless profiles would not all agree."""
    if not rows:
        return {}
    stats: dict[str, float] = {}
    ceilings = 0.0
    for profile in profiles:
        own = [r for r in rows if r.get("annotator") == profile.name]
        stats[f"{prefix}_share/{profile.name}"] = len(own) / len(rows)
        if own:
            ceiling = bayes_ceiling([r["utility_chosen"] for r in own], [r["utility_rejected"] for r in own],
                                    profile.temperature)
            stats[f"{prefix}_bayes_ceiling/{profile.name}"] = ceiling
            ceilings += ceiling * len(own)
    stats[f"{prefix}_bayes_ceiling"] = ceilings / len(rows)
    stats[f"{prefix}_profile_disagreement"] = disagreement(profiles, [r["chosen"] for r in rows],
                                                           [r["rejected"] for r in rows])
    return stats


#: The per-profile gold win rate over SFT (an eval metric) is `PROFILE_WIN_RATE + <profile name>`.
PROFILE_WIN_RATE = "eval/gold_win_rate_vs_sft/"


def worst_served(metrics: dict[str, float]) -> str | None:
    """The profile with the lowest gold win rate over SFT in `metrics` (of a tie, the first by name, so the answer
    does not depend on the order the metrics come in), or None."""
    rates = {k.removeprefix(PROFILE_WIN_RATE): v for k, v in metrics.items() if k.startswith(PROFILE_WIN_RATE)}
    return min(sorted(rates), key=rates.__getitem__) if rates else None
