"""Constitutional AI's critique-and-revise phase: plumbing on a tiny model (no quality claim)."""

from __future__ import annotations

import pytest

from components.generation import SamplingSettings
from components.modeling import build_base_checkpoint, load_tokenizer
from components.review_task import build_embedded_splits, corpus
from components.revision import as_chat, critique_and_revise, fit_context

PRINCIPLES = [{"name": "helpful", "description": "Describe the product in detail."},
              {"name": "honest", "description": "Say only what is true."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-layer GPT-2 on the review task's corpus, not the shared `tiny_checkpoint`: the prompts and critique
    requests use task words and capitals (`Review of the mug:`, `Revision:`) that the synthetic vocabulary
    lacks, and fit_context must decode them back intact."""
    splits = build_embedded_splits(100, 20, 10, 20, 10, 0.2, seed=0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    arch = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}
    return str(build_base_checkpoint(corpus(splits), arch, 200, 0, path))


def test_fit_context_keeps_the_end_of_long_requests(tiny):
    tok = load_tokenizer(tiny)
    long = "the screen is great . " * 40 + "Revision:"
    (fitted,) = fit_context(tok, [long], 20)
    assert len(tok(fitted, add_special_tokens=False)["input_ids"]) <= 20
    assert fitted.endswith("Revision:")
    assert fit_context(tok, ["short"], 20) == ["short"]


def test_as_chat_uses_the_template_and_leaves_plain_models_alone(tiny):
    tokenizer = load_tokenizer(tiny)
    assert as_chat(tokenizer, "hello") == "user: hello</s>assistant:"  # the embedded tokenizer has a template
    tokenizer.chat_template = None
    assert as_chat(tokenizer, "hello") == "hello"


def test_one_round_per_principle_with_history(tiny):
    prompts = ["Review of the mug:", "Review of the lamp:"]
    rows = critique_and_revise(tiny, prompts, [" the handle is good.", " the light is poor."], PRINCIPLES,
                               SamplingSettings(8, 1.0, 2, 0), "cpu")
    assert [r["prompt"] for r in rows] == prompts
    for row in rows:
        assert [h["principle"] for h in row["history"]] == ["helpful", "honest"]
        assert row["original"] in (" the handle is good.", " the light is poor.")
        assert isinstance(row["completion"], str)
