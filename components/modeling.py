"""Tokenizers and models: build the tiny embedded model from a config, load any checkpoint like a hub model.

The embedded default trains a small BPE tokenizer on the task corpus and builds a randomly initialised causal LM
from an architecture dict, then saves both as an ordinary Hugging Face checkpoint. Every later stage loads models
only through `from_pretrained`, so a hub id, a local checkpoint and the embedded model take the same path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
#: The embedded tokenizer's chat template, so conversational data works offline: each message is `role: content`
#: closed by EOS, and the generation prompt is `assistant:`. The rendered prompt is a token prefix of the rendered
#: conversation (TRL's completion mask relies on it); no BOS in the template, since tokenizing the rendered text
#: for generation adds it (as for plain-string prompts). `{% generation %}` marks assistant tokens, so
#: `assistant_only_loss=true` works too.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] + ':' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- else -%}{{ ' ' + message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant:' }}{%- endif -%}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer (Metaspace pre-tokenisation, so decoding restores spaces) on `corpus`.

    Pad differs from EOS: sequence-classification heads find the last real token through the pad id. It carries
    CHAT_TEMPLATE, so message lists (UltraFeedback-style data) can be trained on without a hub model.
    """
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left; trainers set their own side when they need to
    return fast


def build_causal_lm(arch: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """Build a randomly initialised causal LM from an architecture dict (`model_type` plus its config keys)."""
    arch = dict(arch)
    config = AutoConfig.for_model(
        arch.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    return model


def build_base_checkpoint(
    corpus: Iterable[str], arch: dict[str, Any], vocab_size: int, seed: int, out_dir: str | Path
) -> str:
    """Train a tokenizer on `corpus`, build a model from `arch`, and save both as a Hugging Face checkpoint."""
    tokenizer = train_tokenizer(corpus, vocab_size)
    model = build_causal_lm(arch, tokenizer, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


#: Loading options transformers records in a tokenizer and writes back on save (e.g. `local_files_only` follows
#: HF_HUB_OFFLINE), which would make the same tokenizer's saved bytes depend on the environment.
LOAD_ONLY_KWARGS = ("local_files_only", "cache_dir", "force_download", "token", "proxies")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (left, for generation) without reusing EOS where avoidable."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    for name in LOAD_ONLY_KWARGS:  # how it was loaded is not part of it: a saved copy must not depend on that
        tokenizer.init_kwargs.pop(name, None)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # hub models such as GPT-2 ship without a pad token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM (hub id or local checkpoint) with its pad token id set."""
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_reward_model(name_or_path: str, dtype: torch.dtype | None = None,
                      heads: Sequence[str] | None = None) -> PreTrainedModel:
    """Load a sequence-classification model with one output, the scalar reward, or one output per annotator
    profile: `heads` names them for a new model; a saved per-annotator model keeps its own (`reward_heads`)."""
    heads = list(heads or saved_reward_heads(name_or_path) or [])
    labels = {"id2label": dict(enumerate(heads)), "label2id": {h: i for i, h in enumerate(heads)}} if heads else {
        "num_labels": 1}
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=dtype, **labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def saved_reward_heads(name_or_path: str) -> list[str] | None:
    """The profile names of a saved per-annotator reward model (its config's `reward_heads`), else None."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):  # not a checkpoint with a config: let from_pretrained say what is wrong
        return None
    heads = getattr(config, "reward_heads", None)
    return list(heads) if heads else None


def context_length(config: Any) -> int | None:
    """How many positions a model config can attend to (None when the architecture has no fixed limit)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_device(device: str) -> str:
    """`auto` → cuda when available, else cpu; any other torch device string as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters, for logging the model size."""
    return sum(p.numel() for p in model.parameters())


def count_trainable(model: torch.nn.Module) -> int:
    """Number of parameters the optimiser updates (LoRA: the adapters, not the frozen base)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
