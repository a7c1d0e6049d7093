"""What every AI judge shares: the verdict format, the `Judge` protocol, the constitution's principles, the
fingerprint rule, settings parsing and checks, and the label arithmetic of two-order judges.

Judges (one module each, named like their conf/judge/<kind>.yaml) import only from this module, never from each
other; `components.judges.build_judge` picks one by kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

PREFERENCE_VALUES = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclass
class Verdict:
    """One judgement of a pair: `preference` 1.0 = first response better, 0.0 = second, 0.5 = tie.

    `scores_a`/`scores_b` hold per-principle scores when the judge has them; `position_consistent` is set by
    judges asked in both orders (None otherwise); `raw` keeps the judge's own output text, if any.
    """

    preference: float
    scores_a: dict[str, float] | None = None
    scores_b: dict[str, float] | None = None
    position_consistent: bool | None = None
    raw: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.preference) <= 1.0:
            raise ValueError(f"preference must lie in [0, 1], got {self.preference}")
        self.preference = float(self.preference)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain floats, bools, strings)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """Rebuild a verdict written by `to_dict` (unknown keys are an error: the cache is ours)."""
        return cls(**dict(data))


class JudgeError(RuntimeError):
    """A judge could not produce a verdict for one pair after all its retries."""

    def __init__(self, judge: str, index: int, problem: str) -> None:
        """`judge` names the judge, `index` the pair (position in the list given), `problem` the last failure."""
        super().__init__(f"judge {judge} failed on pair {index}: {problem}")
        self.judge, self.index, self.problem = judge, index, problem


@runtime_checkable
class Judge(Protocol):
    """What the labelling stage needs from any judge."""

    def judge(self, prompts: list[str], a: list[str], b: list[str]) -> list[Verdict]:
        """One verdict per (prompt, a, b) triple, in order."""
        ...

    def fingerprint(self) -> str:
        """A stable identifier of the judge's behaviour (kind, model, constitution, settings; no secrets)."""
        ...


@dataclass(frozen=True)
class Principle:
    """One constitution principle: a natural-language description, an optional contrasting violation, a weight."""

    name: str
    description: str
    weight: float
    violation: str | None


def parse_principles(principles: Sequence[Mapping[str, Any]]) -> list[Principle]:
    """Validate the constitution's principles (`{name, description, weight[, violation]}`), failing with the field."""
    if not principles:
        raise ValueError("the constitution has no principles")
    parsed = []
    for i, p in enumerate(principles):
        unknown = set(p) - {"name", "description", "weight", "violation"}
        if unknown or not all(k in p for k in ("name", "description", "weight")):
            raise ValueError(f"principle {i} needs name, description, weight (+ violation); got {sorted(p)}")
        if not str(p["description"]).strip() or float(p["weight"]) <= 0:
            raise ValueError(f"principle {p['name']!r}: description must be non-empty and weight > 0")
        parsed.append(Principle(str(p["name"]), str(p["description"]), float(p["weight"]), p.get("violation")))
    if len({p.name for p in parsed}) != len(parsed):
        raise ValueError(f"principle names must be unique: {[p.name for p in parsed]}")
    return parsed


def render_constitution(principles: Sequence[Principle]) -> str:
    """The constitution as prompt text for LM judges: one line per principle with its weight and violation."""
    lines = []
    for p in principles:
        avoid = f" Avoid: {p.violation}" if p.violation else ""
        lines.append(f"- {p.name} (weight {p.weight:g}): {p.description}{avoid}")
    return "\n".join(lines)


def fingerprint_of(kind: str, payload: Mapping[str, Any], code: str) -> str:
    """`kind-` + sha256 of the canonical JSON of what defines a judge's behaviour, including its code.

    `code` is the judge's module (`__name__`, already imported): its source and this module's are hashed in, so
    editing how a judge decides never reuses verdicts cached by the old code (the same rule as the stage keys).
    """
    sources = {
        name: hashlib.sha256(Path(sys.modules[name].__file__).read_bytes()).hexdigest()
        for name in sorted({__name__, code})
    }
    text = json.dumps({"kind": kind, "code": sources, **payload}, sort_keys=True, separators=(",", ":"), default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()}"


def settings_from(cls: type, kind: str, settings: Mapping[str, Any]) -> Any:
    """Build a settings dataclass from the YAML node, naming missing or unknown keys (no defaults in code)."""
    names = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = names - set(settings), set(settings) - names
    if missing or unknown:
        raise ValueError(f"judge {kind!r} settings: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return cls(**dict(settings))


def check_number(
    name: str,
    value: Any,
    *,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Fail with `<name> = <value> is invalid: use <rule>` unless `value` is a number (an int if `integer`)
    within the given bounds (None also passes when `optional`). Settings call it from `__post_init__`."""
    if optional and value is None:
        return
    number = not isinstance(value, bool) and isinstance(value, int if integer else int | float)
    ok = (
        number
        and (at_least is None or value >= at_least)
        and (above is None or value > above)
        and (below is None or value < below)
    )
    if not ok:
        bounds = [f">= {at_least:g}" if at_least is not None else "", f"> {above:g}" if above is not None else ""]
        bounds.append(f"< {below:g}" if below is not None else "")
        rule = " and ".join(b for b in bounds if b)
        rule = f"{'an integer' if integer else 'a number'}{' ' + rule if rule else ''}"
        raise ValueError(f"{name} = {value!r} is invalid: use {'null or ' if optional else ''}{rule}")


def label_of(p_first: float, tie_margin: float) -> str:
    """'a', 'b' or 'tie' from the probability that the first response is better (tie within the margin of 0.5)."""
    return label_from_difference(p_first - 0.5, tie_margin)


def combine_orders(label_ab: str, label_ba: str) -> tuple[float, bool]:
    """Merge the labels from both presentation orders, each already mapped back to the original a/b.

    Agreeing orders keep their label; disagreeing ones (a position-biased answer) become a tie.
    Returns (preference, position_consistent).
    """
    consistent = label_ab == label_ba
    return (PREFERENCE_VALUES[label_ab] if consistent else 0.5), consistent


def check_lengths(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> None:
    """Fail early when the three lists of a judge call differ in length."""
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"judge got {len(prompts)} prompts, {len(a)} first and {len(b)} second responses")


def label_from_difference(diff: float, tie_margin: float) -> str:
    """'a', 'b' or 'tie' from a score difference (first minus second): a tie when |diff| <= tie_margin."""
    if abs(diff) <= tie_margin:
        return "tie"
    return "a" if diff > 0 else "b"


def checkpoint_identity(name_or_path: str) -> str:
    """What identifies a model: a local directory by the sha256 of its files, a hub id by the id itself.

    Hashing the content keeps a fingerprint valid when an artifact moves and changes it when weights change.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
