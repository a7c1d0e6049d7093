"""Sample completions from a causal LM and score the log-probabilities of completion tokens.

Shared by PPO (rollouts, policy and reference log-probabilities) and by evaluation (samples, KL to the SFT
model). A batch is laid out as `[pad… prompt | completion pad…]`: prompts are left-padded, completions
right-padded, so every row's completion starts at the same column `n_prompt`. Position ids always come from
the attention mask, so a left-padded row is scored exactly like the same row without padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.settings import SamplingSettings


@dataclass
class Rollout:
    """Sampled completions for a batch of prompts (tensors live on the model's device).

    `completion_mask` is 1 for real completion tokens, the EOS token included, and 0 after it;
    `completion_ids` holds the pad id wherever the mask is 0.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, T) right-padded
    completion_mask: torch.Tensor  # (B, T)
    ended_with_eos: torch.Tensor  # (B,) bool
    texts: list[str]  # decoded completions, special tokens skipped
    scores: TokenScores | None = None  # the sampler's own view of its tokens, when asked for

    @property
    def n_prompt(self) -> int:
        """Width of the (left-padded) prompt block: the column where completions start."""
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and completion ids side by side, shape (B, P + T)."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """Attention mask for `input_ids`: prompt padding and tokens after EOS are 0."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real completion tokens per row (EOS included)."""
        return self.completion_mask.sum(dim=1)


@dataclass
class TokenScores:
    """What the sampling model computed for each completion token while generating it, so PPO needs no second
    policy forward: log-probability and entropy under softmax(logits / temperature) (0 where masked) and the last
    hidden state of the position that predicted the token (for a value head)."""

    logprobs: torch.Tensor  # (B, T)
    entropy: torch.Tensor  # (B, T)
    hidden: torch.Tensor  # (B, T, H)


@dataclass
class TokenLogprobs:
    """Per-token log-probabilities (and optionally entropies) of completion tokens, 0 where masked."""

    logprobs: torch.Tensor  # (B, T)
    entropy: torch.Tensor | None  # (B, T) or None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: running count of real tokens minus one, clamped at 0."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def mask_after_eos(
    completion_ids: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each completion after its first EOS: returns (ids padded after EOS, mask incl. EOS, ended flags).

    Works when pad equals EOS (hub GPT-2): only the first EOS counts.
    """
    is_eos = completion_ids == eos_token_id
    ended = is_eos.any(dim=1)
    width = completion_ids.shape[1]
    first_eos = torch.where(
        ended, is_eos.int().argmax(dim=1), torch.full_like(ended, width, dtype=torch.long)
    )
    columns = torch.arange(width, device=completion_ids.device)
    mask = (columns[None, :] <= first_eos[:, None]).long()
    return completion_ids.masked_fill(mask == 0, pad_token_id), mask, ended


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG for the block (HF sampling uses it), then restore the previous state."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _generate_chunk(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    keep_scores: bool,
) -> tuple[torch.Tensor, TokenScores | None]:
    """Plain ancestral sampling (no top-k/top-p/penalties) for one chunk; returns the new tokens and, if
    `keep_scores`, their log-probs, entropies and predicting hidden states from the generation steps themselves.

    The hidden states are the LM head's input at each step's last position, caught by a hook: no model keeps
    every layer's states for the whole prompt (`output_hidden_states` would, at every step)."""
    captured: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _, args: captured.append(args[0][:, -1])) if keep_scores else None
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=keep_scores,
        )
    finally:
        if hook is not None:
            hook.remove()
    tokens = out.sequences[:, input_ids.shape[1] :]
    if not keep_scores:
        return tokens, None
    logits = torch.stack(out.logits, dim=1)  # (B, T, V): raw logits of each step, before temperature
    stats = completion_token_stats(logits, tokens, torch.ones_like(tokens), temperature, return_entropy=True)
    return tokens, TokenScores(stats.logprobs, stats.entropy, torch.stack(captured, dim=1))


def _join_scores(parts: list[TokenScores | None], width: int, mask: torch.Tensor) -> TokenScores | None:
    """One TokenScores for the whole batch: chunks padded to `width` columns, zero where `mask` is 0."""
    if parts[0] is None:
        return None
    pad = [width - part.logprobs.shape[1] for part in parts]  # type: ignore[union-attr]
    logprobs = torch.cat([F.pad(p.logprobs, (0, n)) for p, n in zip(parts, pad, strict=True)]) * mask
    entropy = torch.cat([F.pad(p.entropy, (0, n)) for p, n in zip(parts, pad, strict=True)]) * mask
    hidden = torch.cat([F.pad(p.hidden, (0, 0, 0, n)) for p, n in zip(parts, pad, strict=True)])
    return TokenScores(logprobs, entropy, hidden)


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    generator_seed: int | None,
    keep_scores: bool = False,
) -> Rollout:
    """Sample one completion per prompt, `batch_size` prompts per `generate` call, with the KV cache.

    Sampling is plain (top_k=0, top_p=1) so the tokens follow softmax(logits / temperature), the distribution
    PPO's log-probabilities assume. `generator_seed` makes sampling reproducible without disturbing the
    caller's RNG stream; None uses the global RNG as it stands. `keep_scores` also returns the sampler's
    per-token `TokenScores` (what a policy forward over the rollout would compute, without running it).
    """
    device = model.device
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt").to(device)
    chunks = []
    with _seeded(generator_seed, device), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            chunks.append(_generate_chunk(model, tokenizer, enc.input_ids[rows], enc.attention_mask[rows],
                                          max_new_tokens, temperature, keep_scores))  # fmt: skip
    width = max(tokens.shape[1] for tokens, _ in chunks)
    pad_id = tokenizer.pad_token_id
    raw = torch.cat([F.pad(tokens, (0, width - tokens.shape[1]), value=pad_id) for tokens, _ in chunks])
    ids, mask, ended = mask_after_eos(raw, tokenizer.eos_token_id, pad_id)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    scores = _join_scores([part for _, part in chunks], width, mask)
    return Rollout(enc.input_ids, enc.attention_mask, ids, mask, ended, texts, scores)


def with_final_eos(rollout: Rollout, eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of prompt + completion + EOS for every row: completions cut at the token
    limit get the EOS they never sampled (as a reward model saw `prompt + completion + eos` in training)."""
    ids = F.pad(rollout.input_ids, (0, 1), value=pad_token_id)
    mask = F.pad(rollout.attention_mask, (0, 1), value=0)
    rows = torch.nonzero(~rollout.ended_with_eos).squeeze(1)
    end = rollout.n_prompt + rollout.lengths[rows]
    ids[rows, end] = eos_token_id
    mask[rows, end] = 1
    return ids, mask


def sample(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: SamplingSettings,
    seed: int | None = None,
) -> Rollout:
    """`sample_completions` with its knobs from `settings` (`seed` replaces `settings.seed` when given)."""
    return sample_completions(model, tokenizer, prompts, settings.max_new_tokens, settings.temperature,
                              settings.batch_size, settings.seed if seed is None else seed)


def completion_token_stats(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
    return_entropy: bool,
) -> TokenLogprobs:
    """Log-probabilities of `completion_ids` under softmax(logits / temperature), plus entropy if asked.

    `logits` are the ones that predict the completion tokens: shape (B, T, V), aligned with `completion_ids`.
    """
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logprobs = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * completion_mask
    entropy = None
    if return_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1) * completion_mask
    return TokenLogprobs(logprobs, entropy)


def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_prompt: int,
    completion_mask: torch.Tensor,
    temperature: float,
    return_entropy: bool,
) -> TokenLogprobs:
    """Per-token log-probabilities of the completion tokens `input_ids[:, n_prompt:]` in one forward pass.

    Prompts must be left-padded to width `n_prompt`; position ids come from the attention mask. Runs with
    gradients if the caller has them enabled (wrap in `torch.no_grad()` for scoring only).
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    )
    logits = out.logits[:, n_prompt - 1 : -1]
    return completion_token_stats(
        logits, input_ids[:, n_prompt:], completion_mask, temperature, return_entropy
    )


def render_prompts(prompts: list, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Prompts as the text a model continues: strings as they are, conversations (lists of {role, content})
    through the tokenizer's chat template with the generation prompt, so on-policy sampling sees what SFT saw."""
    rendered = []
    for prompt in prompts:
        if isinstance(prompt, str):
            rendered.append(prompt)
        elif getattr(tokenizer, "chat_template", None):
            rendered.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        else:
            raise ValueError(
                "conversational prompts need a tokenizer with a chat template: use an instruction model "
                "(model=…), or give prompts as plain strings"
            )
    return rendered
