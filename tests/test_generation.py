"""Sampling, EOS masks, left-padded log-probabilities and reward scoring on a tiny random GPT-2."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from components.generation import (
    mask_after_eos,
    position_ids_from_mask,
    sample_completions,
    sequence_logprobs,
    with_final_eos,
)
from components.modeling import load_causal_lm, load_tokenizer
from components.scoring import RewardScorer

PROMPTS = ["the cat", "a dog sat on the", "very", "the big red dog ran under a small blue log and"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eos_prone(tiny_checkpoint):
    """The tiny model with a biased output layer so EOS is sampled often (~10% per step)."""
    tokenizer = load_tokenizer(tiny_checkpoint)
    model = load_causal_lm(tiny_checkpoint).eval()
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = math.log(0.1 * len(tokenizer))
    model.lm_head = head
    return model, tokenizer


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_mask_after_eos_keeps_first_eos_and_pads_the_rest():
    eos, pad = 2, 0
    raw = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 9, 9, 9, 9]])
    ids, mask, ended = mask_after_eos(raw, eos, pad)
    assert ended.tolist() == [True, False, True]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ids.tolist() == [[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]


def test_mask_after_eos_when_pad_equals_eos():
    raw = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]])
    ids, mask, ended = mask_after_eos(raw, eos_token_id=2, pad_token_id=2)
    assert ended.tolist() == [True, False]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ids.tolist() == raw.tolist()


def test_sample_completions_masks_and_texts(eos_prone):
    model, tokenizer = eos_prone
    prompts = PROMPTS * 4
    out = sample_completions(model, tokenizer, prompts, 12, 1.0, 5, generator_seed=0)
    n = len(prompts)
    assert out.prompt_ids.shape[0] == out.completion_ids.shape[0] == n and len(out.texts) == n
    assert out.completion_ids.shape[1] <= 12
    assert out.prompt_mask[:, -1].all()  # left padding: the last prompt column is always real
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert 0 < int(out.ended_with_eos.sum()) < n  # both kinds present with this seed
    for row in range(n):
        ids, mask = out.completion_ids[row], out.completion_mask[row]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        assert (ids[length:] == pad).all()
        if out.ended_with_eos[row]:
            assert ids[length - 1] == eos and (ids[: length - 1] != eos).all()
        else:
            assert length == 12 and (ids != eos).all()
        assert out.texts[row] == tokenizer.decode(ids[:length], skip_special_tokens=True)
    assert torch.equal(out.input_ids[:, out.n_prompt :], out.completion_ids)


def test_sample_completions_is_reproducible_and_leaves_global_rng_alone(eos_prone):
    model, tokenizer = eos_prone
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = sample_completions(model, tokenizer, PROMPTS, 8, 1.0, 4, generator_seed=7)
    assert torch.equal(torch.rand(3), expected_draw)
    again = sample_completions(model, tokenizer, PROMPTS, 8, 1.0, 4, generator_seed=7)
    assert torch.equal(first.completion_ids, again.completion_ids) and first.texts == again.texts
    other = sample_completions(model, tokenizer, PROMPTS, 8, 1.0, 4, generator_seed=8)
    assert other.texts != first.texts


def test_sequence_logprobs_match_unpadded_forward(eos_prone):
    """Left padding + mask-derived positions must give the same log-probs as each row alone, unpadded."""
    model, tokenizer = eos_prone
    out = sample_completions(model, tokenizer, PROMPTS, 10, 1.0, 4, generator_seed=3)
    assert not out.prompt_mask.all()  # the check is only meaningful with padding present
    temperature = 0.7
    with torch.no_grad():
        got = sequence_logprobs(
            model, out.input_ids, out.attention_mask, out.n_prompt, out.completion_mask, temperature, True
        )
        for row in range(len(PROMPTS)):
            prompt = out.prompt_ids[row][out.prompt_mask[row].bool()]
            completion = out.completion_ids[row][out.completion_mask[row].bool()]
            ids = torch.cat([prompt, completion])[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0] / temperature, dim=-1)
            expected = logp[len(prompt) - 1 : -1].gather(-1, completion[:, None]).squeeze(-1)
            length = len(completion)
            torch.testing.assert_close(got.logprobs[row, :length], expected, atol=1e-5, rtol=1e-5)
            assert (got.logprobs[row, length:] == 0).all()
    assert got.entropy is not None
    assert (got.entropy >= 0).all() and (got.entropy <= math.log(len(tokenizer)) + 1e-4).all()
    assert (got.entropy * (1 - out.completion_mask) == 0).all()


def test_reward_scorer_appends_eos_and_is_padding_invariant(tiny_checkpoint):
    torch.manual_seed(0)
    scorer = RewardScorer(tiny_checkpoint, "cpu", None)
    prompts, completions = PROMPTS, [" dog", " sat on a mat", "", " happy"]
    assert scorer.texts(prompts, completions)[0] == "the cat dog" + scorer.tokenizer.eos_token
    batched = scorer.score(prompts, completions, batch_size=4)
    singles = [scorer.score([p], [c], batch_size=1)[0] for p, c in zip(prompts, completions, strict=True)]
    assert all(isinstance(s, float) for s in batched)
    assert batched == pytest.approx(singles, abs=1e-5)
    assert len(set(batched)) == len(batched)  # the head is random, so different texts score differently
    with pytest.raises(ValueError):
        scorer.score(prompts, completions[:2], batch_size=2)


def test_token_scorer_scores_sampled_ids_like_the_text_path(eos_prone, tiny_checkpoint):
    """Scoring the sampled ids (+ EOS where the limit cut a completion) gives the text path's reward wherever
    re-tokenising the decoded text gives the same tokens back; another vocabulary falls back to texts."""
    model, tokenizer = eos_prone
    scorer = RewardScorer(tiny_checkpoint, "cpu", None)
    out = sample_completions(model, tokenizer, PROMPTS * 3, 6, 1.0, 5, generator_seed=1)
    assert out.ended_with_eos.any() and not out.ended_with_eos.all()
    ids, mask = with_final_eos(out, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (ids[mask.bool()] == tokenizer.eos_token_id).sum() == len(PROMPTS) * 3  # exactly one EOS per row
    by_ids = scorer.token_scorer(tokenizer, batch_size=4)(ids, mask)
    by_text = scorer.score(PROMPTS * 3, out.texts, batch_size=4)
    same = [i for i, text in enumerate(scorer.texts(PROMPTS * 3, out.texts))
            if tokenizer(text).input_ids == ids[i][mask[i].bool()].tolist()]  # fmt: skip
    assert same, "no completion re-tokenised to its own ids: the check would be empty"
    assert [by_ids[i] for i in same] == pytest.approx([by_text[i] for i in same], abs=1e-5)

    other = load_tokenizer(tiny_checkpoint)
    other.add_tokens(["zzz-new-token"])
    assert scorer.token_scorer(other, batch_size=4) is None
    assert RewardScorer(tiny_checkpoint, "cpu", max_length=16).token_scorer(tokenizer, 4) is None
