"""AI judges for RLAIF: label which of two responses to a prompt better follows a written constitution.

Every judge answers `judge(prompts, a, b) -> list[Verdict]` and names its behaviour with `fingerprint()` (kind,
model, constitution, behavioural settings; never a secret), which keys the labelling cache. Four kinds, one
module each named like its conf/judge/<kind>.yaml, built by `build_judge(kind, settings, principles)`:

- `constitution`: a sentence encoder (MiniLM) scores each response against each principle's description (and
  its contrasting `violation`); per-principle scores are kept, the weighted total decides with a tie margin.
- `llm`: a local causal LM asked pairwise in both orders.
- `openai_compatible`: an HTTP chat-completions endpoint asked in both orders.
- `reward_model`: an existing sequence-classification checkpoint; preference from the score difference.

Judges asked in both orders cancel position bias: disagreeing orders give a tie and `position_consistent=False`.
What they share (Verdict, JudgeError, Judge, principles, fingerprints) lives in `components.judges.base`; the judge
modules import only from it. They are imported here inside `build_judge`, so building one judge never loads
another's dependencies (torch, httpx).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from components.judges.base import Judge, parse_principles, settings_from

KINDS = ("constitution", "llm", "openai_compatible", "reward_model")


def build_judge(kind: str, settings: Mapping[str, Any], principles: Sequence[Mapping[str, Any]]) -> Judge:
    """Build a judge of `kind` (constitution | llm | openai_compatible | reward_model) from its YAML settings."""
    parsed = parse_principles(principles)
    if kind == "constitution":
        from components.judges.constitution import ConstitutionJudge, ConstitutionSettings

        return ConstitutionJudge(settings_from(ConstitutionSettings, kind, settings), parsed)
    if kind == "llm":
        from components.judges.llm import LLMJudge, LLMSettings

        return LLMJudge(settings_from(LLMSettings, kind, settings), parsed)
    if kind == "openai_compatible":
        from components.judges.openai_compatible import HTTPJudge, HTTPSettings

        return HTTPJudge(settings_from(HTTPSettings, kind, settings), parsed)
    if kind == "reward_model":
        from components.judges.reward_model import RewardModelJudge, RewardModelSettings

        return RewardModelJudge(settings_from(RewardModelSettings, kind, settings))
    raise ValueError(f"unknown judge kind {kind!r}: {' | '.join(KINDS)}")
