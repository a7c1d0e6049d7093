"""Real use on local files: `model=` a local checkpoint and `data=files` JSONL/Parquet, through the same flow.

The hub-loading path is the same code (`datasets.load_dataset` / `from_pretrained`); here it reads files we
write, since tests never touch the network. A malformed dataset fails in prepare_data, before any training.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from components.data import DatasetValidationError
from components.modeling import build_base_checkpoint
from components.review_task import build_embedded_splits, corpus
from flows.pipeline import alignflow

TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 96}


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> dict[str, Path]:
    """A user's own data (JSONL demos, Parquet pairs) and a local causal-LM checkpoint.

    The checkpoint is built here, not the shared `tiny_checkpoint`: the whole pipeline trains on review-task
    data, which needs a tokenizer trained on that corpus and n_positions 96 for its sequences."""
    root = tmp_path_factory.mktemp("user")
    splits = build_embedded_splits(300, 200, 20, 40, 20, 0.2, seed=3)
    pd.DataFrame(splits["sft"]).to_json(root / "demos.jsonl", orient="records", lines=True)
    pairs = pd.DataFrame(splits["preference"])[["prompt", "chosen", "rejected"]]
    pairs.to_parquet(root / "pairs.parquet")
    build_base_checkpoint(corpus(splits), TINY, 256, 0, root / "checkpoint")
    return {"sft": root / "demos.jsonl", "preference": root / "pairs.parquet", "model": root / "checkpoint"}


def overrides(files: dict[str, Path]) -> list[str]:
    return [
        "data=files", f"data.sft.path={files['sft']}", f"data.preference.path={files['preference']}",
        "data.eval_fraction=0.1", f"model.name_or_path={files['model']}", "model.init=null",
        "sft.args.num_train_epochs=1", "reward.args.num_train_epochs=1",
        "rl.total_updates=2", "rl.batch_size=16", "rl.mini_batch_size=8", "rl.rollout_batch_size=16",
        "eval.max_prompts=16",
    ]


def test_local_model_and_files_run_the_whole_pipeline(prefect_harness, store, user_files):
    summary = alignflow(overrides=overrides(user_files))
    metrics = {k: v for s in summary["stages"] for k, v in s["metrics"].items()}
    assert metrics["data/n_preference"] == 180 and metrics["data/n_preference_eval"] == 20
    assert metrics["data/n_eval_prompts"] == 20
    assert "eval/proxy_reward_mean" in metrics and "eval/proxy_win_rate_vs_sft" in metrics
    assert "eval/gold_reward_mean" not in metrics  # user data has no gold reward: nothing is made up
    sft_dir = Path(next(s["path"] for s in summary["stages"] if s["stage"] == "sft"))
    assert not (sft_dir / "base").exists()  # the given checkpoint is used as it is
    client = MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")
    data_run = client.get_run(next(s["mlflow_run_id"] for s in summary["stages"] if s["stage"] == "data"))
    names = {d.dataset.name for d in data_run.inputs.dataset_inputs}
    assert {"files/sft", "files/preference", "files/preference_eval"} <= names

    # The cache follows the file's bytes, not its name: the same pairs file edited in place (chosen and
    # rejected swapped on every row, same path, same row count) rebuilds data and everything after it.
    pairs = pd.read_parquet(user_files["preference"])
    swapped = pairs.rename(columns={"chosen": "rejected", "rejected": "chosen"})[pairs.columns]
    swapped.to_parquet(user_files["preference"])
    try:
        again = alignflow(overrides=overrides(user_files))
    finally:
        pairs.to_parquet(user_files["preference"])  # later tests use the original file
    assert not any(s["cached"] for s in again["stages"])
    data_dir = Path(next(s["path"] for s in again["stages"] if s["stage"] == "data"))
    first = pd.read_json(data_dir / "preference.jsonl", lines=True)
    assert set(first["chosen"]) <= set(swapped["chosen"])  # the edited content, not the old one


def test_malformed_dataset_fails_before_training(prefect_harness, store, user_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    pd.DataFrame({"prompt": ["Review of the mug:"] * 4, "chosen": [" nice mug."] * 4,
                  "rejectd": [" bad."] * 4}).to_json(bad, orient="records", lines=True)
    args = [a if not a.startswith("data.preference.path") else f"data.preference.path={bad}"
            for a in overrides(user_files)]
    with pytest.raises(DatasetValidationError, match="rejected"):
        alignflow(overrides=args)
    assert not (store / "artifacts").exists()
    assert not (store / "mlruns").exists()  # stopped at the door: no run was opened, none is left RUNNING


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_conversational_data_runs_through_the_chat_template(prefect_harness, store, user_files, tmp_path):
    """`messages` demos and conversational pairs with implicit prompts: TRL's other standard formats."""
    from components.modeling import load_tokenizer

    splits = build_embedded_splits(200, 120, 10, 20, 10, 0.2, seed=4)

    def chat(prompt: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.strip()}]

    demos = [{"messages": chat(r["prompt"], r["completion"])} for r in splits["sft"]]
    pairs = [{"chosen": chat(r["prompt"], r["chosen"]), "rejected": chat(r["prompt"], r["rejected"])}
             for r in splits["preference"]]
    pd.DataFrame(demos).to_json(tmp_path / "demos.jsonl", orient="records", lines=True)
    pd.DataFrame(pairs).to_json(tmp_path / "pairs.jsonl", orient="records", lines=True)
    model = shutil.copytree(user_files["model"], tmp_path / "chat_model")  # the same model, with a chat template
    tokenizer = load_tokenizer(str(model))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    args = [a for a in overrides({**user_files, "model": model})
            if not a.startswith(("data.sft.path", "data.preference.path"))]
    summary = alignflow(overrides=[*args, f"data.sft.path={tmp_path / 'demos.jsonl'}",
                                   f"data.preference.path={tmp_path / 'pairs.jsonl'}"])
    metrics = {k: v for s in summary["stages"] for k, v in s["metrics"].items()}
    assert metrics["data/n_preference"] == 108
    assert 0.0 <= metrics["reward/eval_accuracy"] <= 1.0 and "eval/proxy_win_rate_vs_sft" in metrics
    eval_dir = next(s["path"] for s in summary["stages"] if s["stage"] == "eval")
    first = pd.read_json(f"{eval_dir}/samples.jsonl", lines=True).iloc[0]
    assert first["prompt"].startswith("user: Review of the") and first["prompt"].endswith("assistant:")
