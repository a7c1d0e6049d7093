"""Score prompt/completion pairs with a trained sequence-classification reward model.

Texts are scored as `prompt + completion + eos_token`, the way TRL's RewardTrainer saw them in training, and
are re-tokenised with the reward model's own tokenizer, so a reward model with another vocabulary than the
policy works. Padding is on the right so positions match unpadded training rows. When the policy shares the
reward model's tokenizer, `token_scorer` scores the sampled token ids directly instead (no decode, re-tokenise).
A reward model with one head per annotator profile (components/reward.py) scores the weighted sum of its heads, by
the mix it was saved with, so RL and evaluation read one scalar whatever the model.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from components.generation import position_ids_from_mask
from components.hooks import TokenRewardFn
from components.modeling import load_reward_model, load_tokenizer


class RewardScorer:
    """A frozen reward model plus its tokenizer; `score` returns one float per (prompt, completion) pair."""

    def __init__(self, path: str, device: str | torch.device, max_length: int | None) -> None:
        """Load the reward model and tokenizer from `path` in eval mode on `device`.

        `max_length` truncates long texts from the left (keeping the completion's end and its EOS), or None
        for no truncation.
        """
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.model = load_reward_model(path).to(self.device).eval()
        self.model.requires_grad_(False)
        self.max_length = max_length
        self.heads: list[str] = list(getattr(self.model.config, "reward_heads", None) or [])
        self.mix: list[float] = list(getattr(self.model.config, "reward_mix", None) or [1.0] * len(self.heads))
        self._weights = torch.tensor(self.mix or [1.0], dtype=torch.float, device=self.device)

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        """The exact strings the reward model sees: prompt + completion + EOS."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        eos = self.tokenizer.eos_token
        return [
            p + c + eos if isinstance(p, str) and isinstance(c, str) else self._conversation(p, c)
            for p, c in zip(prompts, completions, strict=True)
        ]

    def _conversation(self, prompt: list[dict], completion: list[dict] | str) -> str:
        """A conversational pair rendered by the chat template, as TRL's RewardTrainer tokenises it."""
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)

    def score(self, prompts: list[str], completions: list[str], batch_size: int) -> list[float]:
        """Reward for each pair (the heads mixed, for a per-annotator model), in batches of `batch_size`."""
        return self._reward(self._logits(prompts, completions, batch_size)).tolist()

    def score_heads(self, prompts: list[str], completions: list[str], batch_size: int) -> list[list[float]]:
        """Every head's reward for each pair (one per profile in `heads`; one value for a scalar model)."""
        return self._logits(prompts, completions, batch_size).tolist()

    def _reward(self, logits: torch.Tensor) -> torch.Tensor:
        """The scalar reward of a batch of logits: the only head, or the heads weighted by `mix`."""
        return logits.float() @ self._weights.to(logits.device) if self.heads else logits[:, 0].float()

    @torch.no_grad()
    def _logits(self, prompts: list[str], completions: list[str], batch_size: int) -> torch.Tensor:
        """The reward model's outputs for each pair, (n, heads) on the CPU, in batches without gradients.

        Batches take the texts in order of length, so each pads little (right padding changes no row's score);
        the outputs come back in the pairs' order."""
        texts = self.texts(prompts, completions)
        if not texts:
            return torch.zeros(0, max(1, len(self.heads)))
        ids = self.tokenizer(texts, truncation=self.max_length is not None, max_length=self.max_length).input_ids
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores: list[torch.Tensor] = []
        for start in range(0, len(order), batch_size):
            rows = [{"input_ids": ids[i]} for i in order[start : start + batch_size]]
            enc = self.tokenizer.pad(rows, return_tensors="pt").to(self.device)
            scores.append(self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.float().cpu())
        return torch.cat(scores)[torch.argsort(torch.tensor(order))]

    def shares_tokenizer(self, other: PreTrainedTokenizerBase) -> bool:
        """True when `other` gives every token the same id as ours, special tokens included."""
        mine = self.tokenizer
        same_specials = all(getattr(mine, f"{name}_token_id") == getattr(other, f"{name}_token_id")
                            for name in ("eos", "pad", "bos"))  # fmt: skip
        return same_specials and mine.get_vocab() == other.get_vocab()

    def token_scorer(self, policy_tokenizer: PreTrainedTokenizerBase, batch_size: int) -> TokenRewardFn | None:
        """A `TokenRewardFn` over this reward model for a policy with `policy_tokenizer`; None when the
        tokenizers differ or texts are truncated (then only the text path scores what training saw)."""
        if self.max_length is not None or not self.shares_tokenizer(policy_tokenizer):
            return None
        return lambda input_ids, attention_mask: self.score_ids(input_ids, attention_mask, batch_size)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> list[float]:
        """Reward for each row of token ids (any padding: positions come from the mask; the model reads the last
        non-pad token), in batches of `batch_size`."""
        scores: list[float] = []
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(self.device)
            mask = attention_mask[start : start + batch_size].to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            scores.extend(self._reward(logits).cpu().tolist())
        return scores
