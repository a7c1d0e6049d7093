"""An existing reward model as judge (conf/judge/reward_model.yaml): a sequence-classification checkpoint scores
both responses and the preference follows the score difference, with a tie margin."""

from __future__ import annotations

from dataclasses import dataclass

from components.judges.base import (
    PREFERENCE_VALUES,
    Verdict,
    check_lengths,
    check_number,
    checkpoint_identity,
    fingerprint_of,
    label_from_difference,
)
from components.modeling import resolve_device


@dataclass
class RewardModelSettings:
    """Settings of the reward-model judge (conf/judge/reward_model.yaml); checks itself."""

    path: str  # a sequence-classification checkpoint (one scalar output)
    max_length: int | None  # tokens per scored text, truncated from the left; None: no truncation
    batch_size: int
    tie_margin: float  # |reward difference| at or below this is a tie
    device: str

    def __post_init__(self) -> None:
        check_number("max_length", self.max_length, at_least=1, integer=True, optional=True)
        check_number("batch_size", self.batch_size, at_least=1, integer=True)
        check_number("tie_margin", self.tie_margin, at_least=0)


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
