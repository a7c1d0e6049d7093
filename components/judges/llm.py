"""A local Hugging Face causal LM as a pairwise constitution judge (conf/judge/llm.yaml), asked in both orders.

The judge reads the constitution, the prompt and two responses labelled A and B, and we compare the
next-token log-probabilities of "A" and "B" instead of generating and parsing an answer: one forward pass per
order, a verdict for every pair (no unparseable output, no sampling noise), and a graded margin that a tie can
be cut from. Each pair is asked as (a, b) and as (b, a); the two answers are mapped back to a/b and a
disagreement (the model prefers a position, not a response) becomes a tie with `position_consistent=False`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.generation import position_ids_from_mask
from components.judges.base import (
    Principle,
    Verdict,
    check_lengths,
    check_number,
    checkpoint_identity,
    combine_orders,
    fingerprint_of,
    label_of,
    render_constitution,
)
from components.modeling import load_causal_lm, load_tokenizer, resolve_device

LABELS = ("A", "B")


@dataclass
class LLMSettings:
    """Settings of the local LM judge (all from conf/judge/llm.yaml); checks itself."""

    model: str  # hub id or local checkpoint of a causal LM (an instruction model judges best)
    template: str  # user message with {constitution}, {prompt}, {response_a}, {response_b}
    answer_prefix: str  # text after the chat template's assistant turn (or after the template) before the label
    tie_margin: float  # per order: |P(A) / (P(A) + P(B)) - 0.5| at or below this is a tie
    batch_size: int  # judge prompts per forward pass
    device: str

    def __post_init__(self) -> None:
        check_number("tie_margin", self.tie_margin, at_least=0, below=0.5)  # 0.5 or more: every pair a tie
        check_number("batch_size", self.batch_size, at_least=1, integer=True)


def label_token_ids(tokenizer) -> dict[str, list[int]]:
    """First token ids of each label with and without a leading space; A's and B's sets must not overlap."""
    ids = {}
    for label in LABELS:
        variants = (tokenizer.encode(v, add_special_tokens=False) for v in (label, f" {label}"))
        ids[label] = sorted({v[0] for v in variants if v})
    if not ids["A"] or set(ids["A"]) & set(ids["B"]) or tokenizer.unk_token_id in ids["A"] + ids["B"]:
        raise ValueError(f"the judge's tokenizer cannot tell the labels A and B apart: {ids}")
    return ids


@torch.no_grad()
def first_label_probability(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    label_ids: dict[str, list[int]],
    batch_size: int,
    add_special_tokens: bool,
) -> list[float]:
    """P(A) / (P(A) + P(B)) of the next token after each text, in left-padded batches (one forward pass each).

    Each label's probability sums its token variants ("A", " A"); only the last position's logits are computed.
    """
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            padding_side="left",
            add_special_tokens=add_special_tokens,
            return_tensors="pt",
        ).to(model.device)
        mask = enc.attention_mask
        logits = model(
            input_ids=enc.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=1
        ).logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        lp_a = torch.logsumexp(logp[:, label_ids["A"]], dim=-1)
        lp_b = torch.logsumexp(logp[:, label_ids["B"]], dim=-1)
        out.extend(torch.sigmoid(lp_a - lp_b).cpu().tolist())
    return out


class LLMJudge:
    """Pairwise judge from a local causal LM: P(first better) per order from the A/B next-token log-probs."""

    def __init__(self, settings: LLMSettings, principles: list[Principle]) -> None:
        """Load the model and tokenizer; fail early if the tokenizer cannot separate the labels."""
        self.settings, self.principles = settings, principles
        self.tokenizer = load_tokenizer(settings.model)
        self.model = load_causal_lm(settings.model).to(resolve_device(settings.device)).eval()
        self.label_ids = label_token_ids(self.tokenizer)
        self._chat = getattr(self.tokenizer, "chat_template", None) is not None
        self._identity = checkpoint_identity(settings.model)
        self._constitution = render_constitution(principles)

    def judge_text(self, prompt: str, first: str, second: str) -> str:
        """The exact text the model continues: constitution, prompt and the two responses as A and B."""
        user = self.settings.template.format(
            constitution=self._constitution, prompt=prompt, response_a=first, response_b=second
        )
        if not self._chat:
            return user + self.settings.answer_prefix
        messages = [{"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + self.settings.answer_prefix

    def p_first(self, texts: list[str]) -> list[float]:
        """P(A) / (P(A) + P(B)) for the next token after each judge text."""
        special = not self._chat  # a chat template has already written the model's special tokens
        return first_label_probability(
            self.model, self.tokenizer, texts, self.label_ids, self.settings.batch_size, special
        )

    def judge(self, prompts: list[str], a: list[str], b: list[str]) -> list[Verdict]:
        """Ask every pair as (a, b) and (b, a); consistent labels win, disagreements are ties."""
        check_lengths(prompts, a, b)
        n = len(prompts)
        texts = [self.judge_text(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
        texts += [self.judge_text(p, y, x) for p, x, y in zip(prompts, a, b, strict=True)]
        probs = self.p_first(texts)
        verdicts = []
        for p_ab, p_ba in zip(probs[:n], probs[n:], strict=True):
            label_ab = label_of(p_ab, self.settings.tie_margin)
            label_ba = label_of(1.0 - p_ba, self.settings.tie_margin)  # swapped: "A" meant b
            preference, consistent = combine_orders(label_ab, label_ba)
            raw = json.dumps({"p_first_ab": round(p_ab, 6), "p_first_ba": round(p_ba, 6)})  # P(shown-first wins)
            verdicts.append(Verdict(preference, position_consistent=consistent, raw=raw))
        return verdicts

    def fingerprint(self) -> str:
        """Model identity (content hash of a local checkpoint), prompt, tie margin and principles."""
        s = self.settings
        payload = {
            "model": self._identity,
            "template": s.template,
            "answer_prefix": s.answer_prefix,
            "chat": self._chat,
            "tie_margin": s.tie_margin,
            "principles": [asdict(p) for p in self.principles],
        }
        return fingerprint_of("llm", payload, __name__)
