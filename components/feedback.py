"""Human feedback as a stage: K sampled responses per prompt, a label budget spent where it teaches most, and the
rankings people give turned into preference pairs that keep their annotator.

The pieces here are plain: sampling the candidates, choosing which to send (components.selection), the Label
Studio task each becomes, reading a ranking back, and the label store that makes a loop resumable over days —
an append-only JSONL file keyed by (prompt, responses, annotator), so an item someone already ranked is never
sent again. Talking to a Label Studio server lives in components.label_studio.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from components.selection import STRATEGIES
from components.settings import SamplingSettings

SOURCES = ("sft", "policy")
#: The ranking interface: the prompt, then the K responses as a list the annotator drags into order (best first).
LABEL_CONFIG = """<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Drag the responses into order: best at the top"/>
  <List name="responses" value="$items" title="Responses"/>
  <Ranker name="rank" toName="responses"/>
</View>"""


@dataclass(frozen=True)
class FeedbackSettings:
    """What one feedback round asks for: `budget` of `n_candidates` prompts, K = `n_responses` each, chosen by
    `strategy` (random | uncertainty | disagreement) with `n_scorers` reward models to score candidates."""

    n_candidates: int
    n_responses: int
    budget: int
    strategy: str
    n_scorers: int = 0

    def __post_init__(self) -> None:
        """Refuse what cannot work, naming the field and the fix."""
        for name, low in (("n_candidates", 1), ("n_responses", 2), ("budget", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} = {value!r} is invalid: use an integer >= {low}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy = {self.strategy!r} is invalid: use one of {', '.join(STRATEGIES)}")
        needed = {"uncertainty": 1, "disagreement": 2}.get(self.strategy, 0)
        if self.n_scorers < needed:
            raise ValueError(f"strategy = {self.strategy} needs {needed}+ reward models in "
                             f"feedback.reward_models (it has {self.n_scorers}): list the paths of reward models "
                             "from an earlier round, or use feedback.strategy=random for the first round")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FeedbackSettings:
        """The settings from the `feedback` config node."""
        names = {f.name for f in fields(cls)} - {"n_scorers"}
        return cls(**{n: cfg[n] for n in names}, n_scorers=len(cfg.get("reward_models") or ()))


def item_key(prompt: str, responses: Sequence[str]) -> str:
    """The identity of one item to rank: sha256 over the prompt and its responses in order (16 hex)."""
    return hashlib.sha256(json.dumps([prompt, list(responses)]).encode()).hexdigest()[:16]


def sample_candidates(model_path: str, prompts: list[str], k: int, settings: SamplingSettings,
                      device: str) -> list[dict[str, Any]]:
    """K completions per prompt (sampling seeds k·seed … k·seed + k − 1). A prompt is dropped when two of its K are
    equal (ranking equal texts teaches nothing) or one is empty. Rows: `{key, prompt, responses}`."""
    from components.generation import sample
    from components.modeling import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path).to(device).eval()
    columns = [sample(model, tokenizer, prompts, settings, seed=k * settings.seed + j).texts for j in range(k)]
    items = []
    for i, prompt in enumerate(prompts):
        responses = [column[i] for column in columns]
        if len(set(responses)) == k and all(r.strip() for r in responses):
            items.append({"key": item_key(prompt, responses), "prompt": prompt, "responses": responses})
    return items


def label_studio_task(item: Mapping[str, Any]) -> dict[str, Any]:
    """One item in Label Studio's import format for LABEL_CONFIG (the key travels in the task's data)."""
    entries = [{"id": f"r{j}", "title": f"Response {j + 1}", "body": text} for j, text in enumerate(item["responses"])]
    return {"data": {"prompt": item["prompt"], "items": entries, "item_key": item["key"]}}


def ranks_from_result(result: Sequence[Mapping[str, Any]], k: int) -> list[int] | None:
    """Ranks (1 = best) from a Label Studio annotation's `result` for LABEL_CONFIG, or None when it holds no full
    ordering of the K responses (a skipped or partial annotation)."""
    for region in result:
        if region.get("type") != "ranker":
            continue
        orders = [v for v in (region.get("value", {}).get("ranker") or {}).values() if isinstance(v, list)]
        order = orders[0] if len(orders) == 1 else None
        if order is None or sorted(order) != [f"r{j}" for j in range(k)]:
            return None
        ranks = [0] * k
        for place, entry in enumerate(order, start=1):
            ranks[int(entry[1:])] = place
        return ranks
    return None


def ranker_result(ranks: Sequence[int]) -> list[dict[str, Any]]:
    """The `result` Label Studio stores when someone drags the responses into the order `ranks` gives."""
    order = [f"r{j}" for j in sorted(range(len(ranks)), key=lambda j: (ranks[j], j))]
    return [{"from_name": "rank", "to_name": "responses", "type": "ranker", "value": {"ranker": {"responses": order}}}]


class LabelStore:
    """Append-only JSONL of rankings: `{key, prompt, responses, ranks, annotator, source}`, one per (key, annotator).

    Shared by every round and run (a lock serialises writers), so labels already given are never asked again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def rows(self) -> list[dict[str, Any]]:
        """Every ranking stored so far (a torn last line from a crash is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def labelled_keys(self) -> set[str]:
        """Item keys that hold at least one ranking."""
        return {row["key"] for row in self.rows()}

    def add(self, rankings: Iterable[Mapping[str, Any]]) -> int:
        """Append the rankings not stored yet (by key and annotator); returns how many were new."""
        with self.path.with_name(self.path.name + ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            seen = {(row["key"], row["annotator"]) for row in self.rows()}
            new = [dict(r) for r in rankings if (r["key"], r["annotator"]) not in seen]
            if new:
                with self.path.open("a") as out:
                    out.writelines(json.dumps(r, sort_keys=True) + "\n" for r in new)
            return len(new)


def open_items(items: Sequence[Mapping[str, Any]], labelled: set[str]) -> list[dict[str, Any]]:
    """The items nobody has ranked yet: the only ones a round may send."""
    return [dict(item) for item in items if item["key"] not in labelled]
