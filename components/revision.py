"""Constitutional AI, supervised phase: a causal LM critiques and revises answers principle by principle.

For each prompt, the SFT model's answer goes through one critique → revision round per principle (Bai et al.
2022); the final revisions become new SFT demonstrations. With an instruction-following reviser this removes
what the principles forbid; with the tiny embedded model it only exercises the plumbing, and claims no effect.
"""

from __future__ import annotations

import torch

from components.generation import SamplingSettings, sample
from components.modeling import load_causal_lm, load_tokenizer

CRITIQUE = (
    "{prompt}{response}\n\nCritique request: identify specific ways in which the response above fails this "
    "principle: {principle}\nCritique:"
)
REVISION = (
    "{prompt}{response}\n\nCritique: {critique}\nRevision request: rewrite the response so that it follows "
    "the principle: {principle}. Give only the rewritten response.\nRevision:"
)


def as_chat(tokenizer, text: str) -> str:
    """Wrap a request in the model's chat template when it has one (instruction models), else leave it plain."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def fit_context(tokenizer, texts: list[str], limit: int) -> list[str]:
    """Keep the last `limit` tokens of each text (the request's end, which asks for the critique or revision)."""
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fitted = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = limit
        while len(ids) > limit:  # decoding and re-encoding can merge differently: shrink until it fits
            text = tokenizer.decode(ids[-keep:])
            if n_tokens(text) <= limit or keep == 1:
                break
            keep -= 1
        fitted.append(text)
    return fitted


def _generate(model, tokenizer, requests: list[str], s: SamplingSettings, step: int) -> list[str]:
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    texts = [as_chat(tokenizer, r) for r in requests]
    if context:  # small models (the embedded default) cannot take the whole critique request
        texts = fit_context(tokenizer, texts, context - s.max_new_tokens - 2)
    rollout = sample(model, tokenizer, texts, s, seed=s.seed + step)
    return [t.strip() for t in rollout.texts]


@torch.no_grad()
def critique_and_revise(
    reviser_path: str, prompts: list[str], responses: list[str], principles: list[dict], settings: SamplingSettings,
    device: str,
) -> list[dict]:
    """Revise each response once per principle; return rows with the final revision and the whole history."""
    tokenizer = load_tokenizer(reviser_path)
    model = load_causal_lm(reviser_path).to(device).eval()
    current = list(responses)
    history: list[list[dict]] = [[] for _ in prompts]
    for step, principle in enumerate(principles):
        text = f"{principle['name']}: {principle['description']}"
        critiques = _generate(model, tokenizer, [
            CRITIQUE.format(prompt=p, response=r, principle=text) for p, r in zip(prompts, current, strict=True)
        ], settings, 2 * step)
        revisions = _generate(model, tokenizer, [
            REVISION.format(prompt=p, response=r, critique=c, principle=text)
            for p, r, c in zip(prompts, current, critiques, strict=True)
        ], settings, 2 * step + 1)
        for rows, c, r in zip(history, critiques, revisions, strict=True):
            rows.append({"principle": principle["name"], "critique": c, "revision": r})
        # An empty revision keeps the previous answer rather than teaching the model to say nothing.
        current = [r if r else old for r, old in zip(revisions, current, strict=True)]
    return [
        {"prompt": p, "completion": " " + c.lstrip() if c else c, "original": o, "history": h}
        for p, c, o, h in zip(prompts, current, responses, history, strict=True)
    ]
