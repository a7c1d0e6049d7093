"""Tests for loading, format detection, validation and normalisation of user datasets (local files only)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from components import data as D
from components.review_task import build_embedded_splits

PAIRS = [
    {"prompt": "Review of the phone:", "chosen": " the screen is great.", "rejected": " bad."},
    {"prompt": "Review of the lamp:", "chosen": " the light is lovely.", "rejected": " dull dull."},
    {"prompt": "Review of the mug:", "chosen": " the glaze is nice.", "rejected": " the glaze is poor."},
]


def _conv(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


CONV_PAIRS = [
    {
        "chosen": _conv(("user", "Sky colour?"), ("assistant", "Blue.")),
        "rejected": _conv(("user", "Sky colour?"), ("assistant", "Green.")),
    },
    {
        "chosen": _conv(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")),
        "rejected": _conv(("system", "Be brief."), ("user", "2+2?"), ("assistant", "5")),
    },
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    """Keep the `datasets` cache of these tests out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_load_table_by_extension(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"pairs{suffix}"
    frame = pd.DataFrame(PAIRS)
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        _jsonl(path, PAIRS)
    table = D.load_table(str(path))
    assert table.to_list() == PAIRS
    assert D.detect_format(table.column_names, str(path)) == "preference"
    assert len(D.load_table(str(path), split="train[:2]")) == 2


def test_load_table_from_save_to_disk(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list(PAIRS)
    ds.save_to_disk(str(tmp_path / "single"))
    assert D.load_table(str(tmp_path / "single")).to_list() == PAIRS
    datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "dict"))
    assert len(D.load_table(str(tmp_path / "dict"), split="test")) == 1
    with pytest.raises(D.DatasetValidationError, match=r"split=.*\['test', 'train'\]"):
        D.load_table(str(tmp_path / "dict"))


def test_load_table_from_data_folder(tmp_path: Path) -> None:
    _jsonl(tmp_path / "train.jsonl", PAIRS)
    _jsonl(tmp_path / "test.jsonl", PAIRS[:1])
    assert D.load_table(str(tmp_path), split="test").to_list() == PAIRS[:1]
    with pytest.raises(D.DatasetValidationError, match="choose a split"):
        D.load_table(str(tmp_path))


def test_load_table_missing_or_unsupported_path(tmp_path: Path) -> None:
    for source in (str(tmp_path / "nope.jsonl"), "./missing/pairs.parquet", "data/pairs.csv"):
        with pytest.raises(D.DatasetValidationError, match="no such file"):
            D.load_table(source)
    (tmp_path / "pairs.xlsx").write_text("x")
    with pytest.raises(D.DatasetValidationError, match="unsupported file type '.xlsx'"):
        D.load_table(str(tmp_path / "pairs.xlsx"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "chosen": \n')
    with pytest.raises(D.DatasetValidationError, match="broken.jsonl: line 1 is not valid JSON"):
        D.load_table(str(tmp_path / "broken.jsonl"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", r"the file is empty \(0 bytes\)"),
        ("blank.jsonl", b"\n \n", "the file is empty"),
        ("cut.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"te', r"line 3 is not valid JSON \(Unterminated string"),
        ("list.jsonl", b'{"text": "a"}\n[1, 2]\n', "line 2: expected one JSON object per line, got list"),
        ("cut.json", b'[{"text": "a"},\n {"text": "b"', "line 2 is not valid JSON"),
        ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"line 2 is not UTF-8 \(byte 0xe9 at column 14\)"),
        ("latin1.csv", b"text\ncaf\xe9\n", "line 2 is not UTF-8"),
        ("bad.parquet", b"PAR1 not really", "not a readable Parquet file"),
    ],
)
def test_unreadable_files_name_the_line(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    """Empty, truncated and non-UTF-8 files fail naming the file and the line, not with a datasets traceback."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(D.DatasetValidationError, match=message) as info:
        D.load_table(str(tmp_path / name))
    assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)


def test_json_document_and_bom_files_load(tmp_path: Path) -> None:
    (tmp_path / "rows.json").write_text(json.dumps(PAIRS, indent=2))
    assert D.load_table(str(tmp_path / "rows.json")).to_list() == PAIRS
    body = "".join(json.dumps(row) + "\n" for row in PAIRS).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body)  # a UTF-8 byte-order mark is still UTF-8
    assert D.load_table(str(tmp_path / "bom.jsonl")).to_list() == PAIRS


# -------------------------------------------------------------------------------------- detection & errors
@pytest.mark.parametrize(
    ("columns", "fmt"),
    [
        (["prompt", "chosen", "rejected", "score"], "preference"),
        (["chosen", "rejected"], "implicit_preference"),
        (["messages"], "conversational"),
        (["prompt", "completion"], "prompt_completion"),
        (["text", "id"], "language_modeling"),
        (["prompt"], "prompt_only"),
    ],
)
def test_detect_format(columns: list[str], fmt: str) -> None:
    assert D.detect_format(columns, "x") == fmt


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (["prompt", "chosen"], "has a 'chosen' column but no 'rejected' column"),
        (["rejected"], "no 'chosen' column"),
        (["completion"], "no 'prompt' column"),
        (["question", "answer"], "Expected one of: preference: prompt, chosen, rejected"),
    ],
)
def test_detect_format_names_missing_column(columns: list[str], message: str) -> None:
    with pytest.raises(D.DatasetValidationError, match=message):
        D.detect_format(columns, "pairs.jsonl")


def _expect_error(tmp_path: Path, rows: list[dict], use: str, *fragments: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(D.DatasetValidationError) as info:
        D.load_records(path, None, None, use)
    for fragment in (path, *fragments):
        assert fragment in str(info.value)


def test_malformed_files_name_row_and_field(tmp_path: Path) -> None:
    rows = [dict(PAIRS[0]), dict(PAIRS[1], chosen="  ")]
    _expect_error(tmp_path, rows, "preference", "row 1, field 'chosen'", "empty string")
    rows = [dict(PAIRS[0], rejected=3), dict(PAIRS[1], rejected=4)]
    _expect_error(tmp_path, rows, "preference", "row 0, field 'rejected'", "got int")
    rows = [dict(p, rejected=p["chosen"]) for p in PAIRS]
    _expect_error(tmp_path, rows, "preference", "'chosen' == 'rejected' in every row")
    rows = [{"prompt": "a", "chosen": " b"}]
    _expect_error(tmp_path, rows, "preference", "no 'rejected' column")
    rows = [{"text": "hello"}]
    _expect_error(tmp_path, rows, "preference", "cannot be used for preference", "prompt, chosen, rejected")
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": None, "completion": " c"}]
    _expect_error(tmp_path, rows, "sft", "row 1, field 'prompt'", "got NoneType")


def test_malformed_messages(tmp_path: Path) -> None:
    rows = [{"messages": _conv(("user", "hi"), ("assistant", "hello"))}, {"messages": [{"content": "hi"}]}]
    _expect_error(tmp_path, rows, "sft", "row 1, field 'messages', message 0: has no 'role'")
    rows = [{"messages": _conv(("user", "hi"), ("robot", "hello"))}]
    _expect_error(tmp_path, rows, "sft", "unknown role 'robot'")
    rows = [{"messages": _conv(("user", "hi"), ("assistant", ""))}]
    _expect_error(tmp_path, rows, "sft", "last message must be a non-empty 'assistant' message")
    rows = [{"messages": "hi there"}]
    _expect_error(tmp_path, rows, "sft", "field 'messages': expected a list of {role, content} messages")
    rows = [{"prompt": "hi", "completion": _conv(("assistant", "hello"))}]
    _expect_error(tmp_path, rows, "sft", "mix plain strings and message lists")


def test_csv_empty_cell_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nReview:, good., bad.\nReview:,, bad.\n")
    with pytest.raises(D.DatasetValidationError, match=r"row 1, field 'chosen'"):
        D.load_records(str(path), None, None, "preference")


def test_implicit_pairs_without_shared_prompt(tmp_path: Path) -> None:
    rows = [{"chosen": "yes", "rejected": "no"}]
    _expect_error(tmp_path, rows, "preference", "share no leading prompt", "add a 'prompt' column")


# ------------------------------------------------------------------------------------------- normalising
def test_preference_records_explicit_and_identical_pairs_dropped() -> None:
    rows = [*PAIRS, dict(PAIRS[0], rejected=PAIRS[0]["chosen"])]
    out = D.to_preference_records([dict(r, score=1.0) for r in rows], "pairs")
    assert out.column_names == ["prompt", "chosen", "rejected"]
    assert out.to_list() == PAIRS


def test_implicit_conversational_prompt_is_common_leading_messages(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "conv.jsonl", CONV_PAIRS)
    out = D.load_records(path, None, None, "preference")
    assert out[0] == {
        "prompt": _conv(("user", "Sky colour?")),
        "chosen": _conv(("assistant", "Blue.")),
        "rejected": _conv(("assistant", "Green.")),
    }
    assert out[1]["prompt"] == _conv(("system", "Be brief."), ("user", "2+2?"))
    prompts = D.load_records(path, None, None, "prompt")
    assert prompts.column_names == ["prompt"] and prompts[1]["prompt"] == out[1]["prompt"]


def test_implicit_string_prompt_splits_at_the_last_turn_marker() -> None:
    """HH-style transcripts: the prompt ends with the last shared "\\n\\nAssistant:", even when both answers start
    alike ("I think …"); texts without a marker split at the common prefix's last word boundary."""
    hh = "\n\nHuman: Sky?\n\nAssistant:"
    rows = [
        {"chosen": f"{hh} I think it is blue.", "rejected": f"{hh} I think it is black."},
        {"chosen": "Review of the lamp: good", "rejected": "Review of the lamp: good good good"},
    ]
    out = D.to_preference_records(rows, "hh")
    assert out[0] == {"prompt": hh, "chosen": " I think it is blue.", "rejected": " I think it is black."}
    assert out[1] == {"prompt": "Review of the lamp:", "chosen": " good", "rejected": " good good good"}
    assert D.extract_shared_prompt("a b c", "a b d") == ("a b", " c", " d")
    turns = f"{hh} Blue.\n\nHuman: Sure?\n\nAssistant:"
    assert D.extract_shared_prompt(f"{turns} I think so.", f"{turns} I think not.") == (
        turns, " I think so.", " I think not.")


def test_conversations_split_at_the_last_shared_message() -> None:
    chosen = _conv(("user", "Hi"), ("assistant", "Hello"), ("user", "Sky?"), ("assistant", "I think blue."))
    rejected = [*chosen[:3], {"role": "assistant", "content": "I think black."}]
    assert D.extract_shared_prompt(chosen, rejected) == (chosen[:3], chosen[3:], rejected[3:])


def test_string_prompt_with_conversational_answers_is_implicit() -> None:
    """UltraFeedback-style rows: a string prompt and conversations that already contain it."""
    rows = [dict(pair, prompt="Sky colour?", score_chosen=8.0) for pair in CONV_PAIRS[:1]]
    out = D.to_preference_records(rows, "ultrafeedback")
    assert out[0]["prompt"] == _conv(("user", "Sky colour?"))
    sft = D.to_sft_records(rows, "ultrafeedback")
    assert sft[0] == {"prompt": _conv(("user", "Sky colour?")), "completion": _conv(("assistant", "Blue."))}


def test_sft_records_from_each_format() -> None:
    assert D.to_sft_records([{"text": "a b", "id": 1}], "t").to_list() == [{"text": "a b"}]
    pc = [{"prompt": "Review:", "completion": " fine.", "meta": 0}]
    assert D.to_sft_records(pc, "pc").to_list() == [{"prompt": "Review:", "completion": " fine."}]
    conv = [{"messages": _conv(("user", "hi"), ("assistant", "hello"))}]
    assert D.to_sft_records(conv, "c").to_list() == conv
    out = D.to_sft_records(PAIRS, "pairs")
    assert out.column_names == ["prompt", "completion"] and out[0]["completion"] == PAIRS[0]["chosen"]


def test_prompt_records_from_each_format() -> None:
    assert D.to_prompt_records(PAIRS, "p")["prompt"] == [p["prompt"] for p in PAIRS]
    conv = [{"messages": _conv(("user", "hi"), ("assistant", "hello"))}]
    assert D.to_prompt_records(conv, "c")[0]["prompt"] == _conv(("user", "hi"))
    with pytest.raises(D.DatasetValidationError, match="no message before the assistant answer"):
        D.to_prompt_records([{"messages": _conv(("assistant", "hello"))}], "c")
    with pytest.raises(D.DatasetValidationError, match="cannot be used for prompt"):
        D.to_prompt_records([{"text": "x"}], "lm")


def test_embedded_splits_pass_validation() -> None:
    splits = build_embedded_splits(50, 40, 20, 10, 10, 0.2, seed=0)
    assert len(D.to_sft_records(splits["sft"], "embedded/sft")) == 50
    assert len(D.to_preference_records(splits["preference"], "embedded/preference")) == 40
    assert len(D.to_prompt_records(splits["eval_prompts"], "embedded/eval_prompts")) == 10


# ------------------------------------------------------------------------------------------------ splitting
def test_train_eval_split_is_deterministic_and_disjoint() -> None:
    ds = datasets.Dataset.from_dict({"i": list(range(100))})
    train, held = D.train_eval_split(ds, 0.2, seed=1)
    assert len(held) == 20 and len(train) == 80
    assert sorted([*train["i"], *held["i"]]) == list(range(100))
    assert list(D.train_eval_split(ds, 0.2, seed=1)[1]["i"]) == list(held["i"])
    assert list(D.train_eval_split(ds, 0.2, seed=2)[1]["i"]) != list(held["i"])
    rows = [{"i": i} for i in range(10)]
    train_rows, held_rows = D.train_eval_split(rows, 3, seed=0)
    assert len(held_rows) == 3 and {r["i"] for r in train_rows + held_rows} == set(range(10))
    for bad in (0, 10, 1.0, 0.0):
        with pytest.raises(ValueError):
            D.train_eval_split(rows, bad, seed=0)
    assert D.sample_rows(rows, 20, seed=0) == rows and len(D.sample_rows(rows, 4, seed=0)) == 4


def test_load_file_splits_errors_name_the_config_field(tmp_path: Path) -> None:
    node = {"name": None, "split": None}
    good = _jsonl(tmp_path / "pref.jsonl", PAIRS)
    (tmp_path / "empty.jsonl").write_text("")
    cfg = {"sft": {**node, "path": str(tmp_path / "empty.jsonl")}, "preference": {**node, "path": good},
           "preference_eval": None, "prompts": None, "eval_fraction": 0.05, "max_samples": None, "seed": 0}
    with pytest.raises(D.DatasetValidationError, match=r"^`data.sft`: .*empty.jsonl: the file is empty"):
        D.load_file_splits(cfg)
    one = _jsonl(tmp_path / "one.jsonl", PAIRS[:1])
    cfg = {**cfg, "sft": {**node, "path": good}, "preference": {**node, "path": one}}
    with pytest.raises(D.DatasetValidationError, match=r"^`data.preference`: .*one.jsonl: 1 row\(s\) cannot be split"):
        D.load_file_splits(cfg)


def test_load_file_splits(tmp_path: Path) -> None:
    node = {"name": None, "split": None}
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Q{i}:", "completion": f" a{i}"} for i in range(20)])
    pairs = [{"prompt": f"Q{i}:", "chosen": " good", "rejected": " bad"} for i in range(40)]
    pref = _jsonl(tmp_path / "pref.jsonl", pairs)
    cfg = {
        "sft": {**node, "path": sft}, "preference": {**node, "path": pref}, "preference_eval": None,
        "prompts": None, "eval_fraction": 0.25, "max_samples": 30, "seed": 0,
    }  # fmt: skip
    splits = D.load_file_splits(cfg)
    assert {k: len(v) for k, v in splits.items()} == {
        "sft": 20, "preference": 22, "preference_eval": 8, "prompts": 22, "eval_prompts": 8,
    }  # fmt: skip
    assert splits["eval_prompts"]["prompt"] == splits["preference_eval"]["prompt"]
    assert not set(splits["prompts"]["prompt"]) & set(splits["eval_prompts"]["prompt"])
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"P{i}:"} for i in range(12)])
    cfg = {**cfg, "prompts": {**node, "path": prompts}, "preference_eval": cfg["preference"]}
    splits = D.load_file_splits(cfg)
    assert (len(splits["preference_eval"]), len(splits["prompts"]), len(splits["eval_prompts"])) == (30, 9, 3)


# ----------------------------------------------------------------------------------- conversational on embedded
def test_embedded_tokenizer_has_a_chat_template_for_conversational_data() -> None:
    """The embedded tokenizer renders message lists offline: `role: content</s>` per message, `assistant:` as the
    generation prompt, the rendered prompt a token prefix of the whole conversation (TRL's completion mask needs
    it), and assistant tokens marked for `assistant_only_loss`."""
    from components.modeling import train_tokenizer
    from components.review_task import corpus

    splits = build_embedded_splits(30, 10, 5, 5, 5, 0.2, seed=0)
    tokenizer = train_tokenizer(corpus(splits), 256)
    chat = _conv(("system", "Be brief."), ("user", "Review of the kettle:"), ("assistant", "a good kettle."))
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == "system: Be brief.</s>user: Review of the kettle:</s>assistant: a good kettle.</s>"
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "system: Be brief.</s>user: Review of the kettle:</s>assistant:" and text.startswith(prompt)
    full = tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    head = tokenizer.apply_chat_template(chat[:2], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert full["input_ids"][: len(head)] == head
    masked = [t for t, m in zip(full["input_ids"], full["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked).strip() == "a good kettle.</s>"
