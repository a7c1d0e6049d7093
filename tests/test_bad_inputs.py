"""Bad inputs fail at the door: exit status 2, one line naming the field or file, nothing trained, no MLflow run.

Most rows run the CLI in-process (`flows.cli.main()` with a patched `sys.argv`, ~0.5 s each) with the flow
replaced by a stub that fails the test if it is ever called; a few run the real `python -m flows.cli` to prove
the exit status and the output end to end. The table is mirrored in the README's "Troubleshooting" section.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import datasets
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from transformers import AutoConfig, AutoModelForSequenceClassification

import flows.cli
from components.modeling import build_causal_lm, train_tokenizer
from components.review_task import build_embedded_splits
from tests.helpers import ARCH, synthetic_corpus

CUDA = torch.cuda.is_available()
FILES = ["data=files", "data.sft.path={sft}", "data.preference.path={pref}"]
DPO = ["pipeline=dpo"]


def sft_file(name: str) -> list[str]:
    """data=files with the SFT split from the file `name` (a key of the `inputs` fixture) and good pairs."""
    return ["data=files", f"data.sft.path={{{name}}}", "data.preference.path={pref}"]


def pref_file(name: str) -> list[str]:
    """data=files with good demonstrations and the preference split from the file `name`."""
    return ["data=files", "data.sft.path={sft}", f"data.preference.path={{{name}}}"]


def _conv(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


# Each row: id, overrides ({name} is a file or checkpoint made below), expected text of the one error line.
BAD_INPUTS = [
    # values (flows.config.validate_config)
    ("dpo-beta-0", [*DPO, "dpo.args.beta=0"], "`dpo.args.beta` = 0 is invalid: use a number > 0"),
    ("sft-epochs-0", ["sft.args.num_train_epochs=0"], "`sft.args.num_train_epochs` = 0"),
    ("dpo-max-length-6", [*DPO, "dpo.args.max_length=6"], "`dpo.args.max_length` = 6"),
    ("dpo-lr-negative", [*DPO, "dpo.args.learning_rate=-1"], "`dpo.args.learning_rate` = -1"),
    ("dpo-batch-0", [*DPO, "dpo.args.per_device_train_batch_size=0"], "`dpo.args.per_device_train_batch_size`"),
    ("sft-max-length-4", ["sft.args.max_length=4"], "`sft.args.max_length` = 4"),
    ("reward-lr-0", ["reward.args.learning_rate=0"], "`reward.args.learning_rate` = 0"),
    ("reward-ema-1", ["reward.ema_decay=1"], "`reward.ema_decay` = 1 is invalid: use a number in (0, 1)"),
    ("grpo-1-generation", ["rl=grpo", "rl.args.num_generations=1"], "`rl.args.num_generations` = 1"),
    ("rloo-steps-0", ["rl=rloo", "rl.args.max_steps=0"], "`rl.args.max_steps` = 0"),
    ("ppo-cliprange", ["rl.cliprange=1.5"], "`rl.cliprange` = 1.5"),
    ("seed-abc", ["seed=abc"], "`seed` = 'abc'"),
    ("num-threads-negative", ["num_threads=-3"], "`num_threads` = -3"),
    ("files-without-paths", ["data=files"], "`data.sft.path` is required"),
    ("max-samples-0", [*FILES, "data.max_samples=0"], "`data.max_samples` = 0"),
    ("eval-fraction-1.5", [*FILES, "data.eval_fraction=1.5"], "`data.eval_fraction` = 1.5"),
    ("model-path-empty", ["model.name_or_path="], "`model.name_or_path` = ''"),
    # machine and TRL's own checks (flows.preflight)
    ("device-cuda-no-gpu", ["device=cuda"], "`device` = 'cuda' is invalid: no CUDA GPU"),
    ("bf16-no-gpu", ["+trainer=gpu"], "`sft.args.bf16` = True is invalid: it needs a CUDA GPU"),
    ("trl-scheduler", ["sft.args.lr_scheduler_type=foo"], "`sft.args` (trl.SFTConfig) is rejected"),
    ("trl-unknown-key", ["+sft.args.learning_rat=0.1"], "unexpected keyword argument 'learning_rat'"),
    ("trl-warmup-negative", ["reward.args.warmup_steps=-1"], "`reward.args` (trl.RewardConfig) is rejected"),
    ("grpo-indivisible", ["rl=grpo", "rl.args.num_generations=3"], "must be divisible by num_generations"),
    # judges
    ("judge-key-unset", ["pipeline=rlaif", "judge=openai_compatible"], "`OPENAI_API_KEY` (named by config field"),
    ("judge-temperature", ["pipeline=rlaif", "judge=openai_compatible", "judge.settings.temperature=-1"],
     "`judge.settings.temperature` = -1"),
    ("judge-rm-two-labels", ["pipeline=rlaif", "judge=reward_model", "judge.settings.path={classifier}"],
     "`judge.settings.path`"),
    ("judge-llm-not-a-model", ["pipeline=rlaif", "judge=llm", "judge.settings.model={not_a_model}"],
     "`judge.settings.model`"),
    # models
    ("model-nonexistent", ["model.name_or_path=/nonexistent"], "`model.name_or_path` = '/nonexistent' is invalid"),
    ("model-dir-not-a-model", ["model.name_or_path={not_a_model}"], "no config.json"),
    ("model-no-weights", ["model.name_or_path={no_weights}"], "has config.json but no weights"),
    ("model-is-classifier", ["model.name_or_path={classifier}"], "is a GPT2ForSequenceClassification checkpoint"),
    ("reward-model-two-labels", ["reward.model_name_or_path={classifier}"], "`reward.model_name_or_path`"),
    ("max-length-over-context", ["model.name_or_path={plain_lm}"],
     "`sft.args.max_length` = 96 is invalid: the model's context is 64 tokens"),
    ("new-tokens-over-context", ["rl.max_new_tokens=200"], "`rl.max_new_tokens` = 200 is invalid: the model's context"),
    ("no-chat-template", [*sft_file("conv"), "model.name_or_path={plain_lm}", "sft.args.max_length=64",
                          "reward.args.max_length=64", "rl.max_new_tokens=16"], "no chat template, but `data.sft`"),
    # data files
    ("file-empty", sft_file("empty"), "empty.jsonl: the file is empty"),
    ("file-blank", sft_file("blank"), "blank.jsonl: the file is empty"),
    ("file-truncated-json", pref_file("truncated"), "truncated.jsonl: line 3 is not valid JSON"),
    ("file-not-utf8", sft_file("latin1"), "latin1.jsonl: line 2 is not UTF-8"),
    ("file-missing", pref_file("missing"), "missing.jsonl: no such file"),
    ("file-unsupported", sft_file("xlsx"), "unsupported file type '.xlsx'"),
    ("file-bad-parquet", pref_file("bad_parquet"), "not a readable Parquet file"),
    ("file-wrong-columns", sft_file("wrong_columns"), "no standard dataset format in columns ['answer', 'question']"),
    ("file-no-rejected", pref_file("no_rejected"), "no 'rejected' column"),
    ("file-empty-cell", pref_file("empty_cell"), "row 1, field 'chosen': empty string"),
    ("file-sft-as-preference", pref_file("sft"), "cannot be used for preference"),
    ("file-one-pair", pref_file("one_pair"), "one_pair.jsonl: 1 row(s) cannot be split"),
    ("prompts-over-context", pref_file("long_prompts"), "exceed the model's context of 96"),
    ("prompts-fill-dpo-max-length", [*DPO, *pref_file("medium_prompts"), "rl.max_new_tokens=16",
                                     "dpo.args.max_length=40"], "leaves fewer than 8 tokens for the answer within 40"),
]
SKIP_ON_GPU = {"device-cuda-no-gpu", "bf16-no-gpu"}


class FlowStarted(BaseException):
    """Raised by the flow stub; a BaseException, so Hydra's error reporting does not turn it into an exit."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Every file and checkpoint the table names, written once."""
    root = tmp_path_factory.mktemp("inputs")
    splits = build_embedded_splits(40, 40, 5, 5, 5, 0.2, seed=0)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in splits["preference"]]
    texts = {
        "sft.jsonl": [{"prompt": r["prompt"], "completion": r["completion"]} for r in splits["sft"]],
        "pref.jsonl": pairs,
        "conv.jsonl": [{"messages": _conv(r["prompt"], r["completion"])} for r in splits["sft"]],
        "wrong_columns.jsonl": [{"question": "q", "answer": "a"}],
        "no_rejected.jsonl": [{"prompt": "p", "chosen": " c"}],
        "empty_cell.jsonl": [pairs[0], {**pairs[1], "chosen": " "}],
        "one_pair.jsonl": pairs[:1],
        "long_prompts.jsonl": [{**p, "prompt": "Review of the kettle: " * 40} for p in pairs],
        "medium_prompts.jsonl": [{**p, "prompt": "Review of the kettle: " * 12} for p in pairs],
    }
    for name, rows in texts.items():
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n  \n")
    (root / "truncated.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:2]) + '{"prompt": "Rev')
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": " b"}\n{"prompt": "caf\xe9"}\n')
    (root / "sft.xlsx").write_text("x")
    (root / "bad.parquet").write_text("not parquet")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")
    tokenizer = train_tokenizer(synthetic_corpus(200, 0), 200)
    tokenizer.chat_template = None  # a base checkpoint without a chat template
    model = build_causal_lm(ARCH, tokenizer, 0)
    model.save_pretrained(root / "plain_lm")
    tokenizer.save_pretrained(root / "plain_lm")
    model.config.save_pretrained(root / "no_weights")
    config = AutoConfig.for_model(**ARCH, vocab_size=len(tokenizer), num_labels=2, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "classifier")
    names = {"bad_parquet": "bad.parquet", "xlsx": "sft.xlsx", "missing": "missing.jsonl"}
    paths = {p.stem: str(p) for p in root.iterdir()} | {k: str(root / v) for k, v in names.items()}
    return paths


@pytest.fixture
def isolated(store, tmp_path, monkeypatch):
    """A fresh store, a private datasets cache, no judge key, Hydra's logging undone afterwards, and a flow stub
    that fails the test if preflight ever lets a row through to training."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def flow(**kwargs):
        raise FlowStarted("the flow started: preflight let this input through")

    monkeypatch.setitem(sys.modules, "flows.pipeline", types.SimpleNamespace(alignflow=flow))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield store
    root.handlers[:] = handlers
    root.setLevel(level)


def _run_cli(overrides: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`alignflow <overrides>` in this process: (exit status, everything it printed)."""
    assert not GlobalHydra.instance().is_initialized()
    monkeypatch.setattr(sys, "argv", ["alignflow", *overrides])
    with pytest.raises(SystemExit) as info:
        flows.cli.main()
    assert not GlobalHydra.instance().is_initialized()  # Hydra cleared it: the next call composes afresh
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def _assert_refused(code: int, output: str, expected: str, root: Path) -> None:
    """Exit ≠ 0, one error line holding `expected`, no traceback, nothing trained, no MLflow store at all."""
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert code == 2, output
    assert len(errors) == 1 and expected in errors[0], output
    assert "Traceback" not in output
    assert not list(root.glob("artifacts/**/DONE"))
    assert not (root / "mlruns").exists()


@pytest.mark.parametrize(("overrides", "expected"), [row[1:] for row in BAD_INPUTS], ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_is_refused_before_anything_runs(request, overrides, expected, inputs, isolated, monkeypatch,
                                                   capsys):
    if CUDA and request.node.callspec.id in SKIP_ON_GPU:
        pytest.skip("this machine has a GPU")
    code, output = _run_cli([o.format(**inputs) for o in overrides], monkeypatch, capsys)
    _assert_refused(code, output, expected, isolated)


def test_table_covers_thirty_bad_inputs():
    assert len(BAD_INPUTS) >= 30 and len({row[0] for row in BAD_INPUTS}) == len(BAD_INPUTS)


def test_conversational_data_passes_on_the_embedded_model(inputs, isolated, monkeypatch, capsys):
    """UltraFeedback-style message lists on the default model: preflight passes (its tokenizer has a chat
    template), so the CLI reaches the flow (here a stub)."""
    overrides = ["data=files", f"data.sft.path={inputs['conv']}", f"data.preference.path={inputs['pref']}"]
    monkeypatch.setattr(sys, "argv", ["alignflow", *overrides])
    with pytest.raises(FlowStarted):
        flows.cli.main()
    assert not (isolated / "mlruns").exists()


@pytest.mark.parametrize(
    ("overrides", "expected", "full_error"),
    [
        (["pipeline=dpo", "dpo.args.beta=0"], "`dpo.args.beta` = 0", False),
        (["data=files", "data.sft.path={empty}", "data.preference.path={pref}"], "the file is empty", False),
        (["model.name_or_path=/nonexistent"], "`model.name_or_path`", True),
    ],
    ids=["value", "data-file", "full-error"],
)
def test_real_cli_exit_status_and_one_line(overrides, expected, full_error, inputs, tmp_path):
    """The installed entry point as a user runs it; HYDRA_FULL_ERROR=1 adds the traceback, nothing else."""
    env = {**os.environ, "ALIGNFLOW_ROOT": str(tmp_path / "root"), "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *(o.format(**inputs) for o in overrides)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    output = proc.stdout + proc.stderr
    if full_error:
        assert proc.returncode == 2 and "Traceback" in output and expected in output
        return
    _assert_refused(proc.returncode, output, expected, tmp_path / "root")
    assert len([line for line in output.splitlines() if line.strip()]) == 1, output
