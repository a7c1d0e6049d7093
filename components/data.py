"""Real datasets in TRL's standard formats: load, detect the format, validate every row, normalise.

Users point `data=` at a hub dataset id or at a local JSONL / JSON / Parquet / CSV file (or a `save_to_disk`
folder). Before any training the table is checked row by row, so a bad file fails in seconds with a message
that names the dataset, the column or the first bad row and field, and the columns that were expected, instead
of failing deep inside a trainer. The normalisers return TRL's explicit-prompt formats (strings or message
lists): `prompt`/`completion` (or `text`, `messages`) for SFT, `prompt`/`chosen`/`rejected` for reward models
and DPO, `prompt` for on-policy RL. Ranked responses (`prompt`, `responses`, `ranks`, optional `annotator`;
components/rankings.py) are accepted wherever pairs are: they become pairs, best-response demos or prompts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from components.errors import DatasetValidationError
from components.rankings import RankingSettings, best_responses, is_ranking, rankings_to_pairs

log = logging.getLogger(__name__)

#: Local file extensions and the `datasets` builder that reads each.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
#: The columns of each standard format (TRL's dataset formats).
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "conversational": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "language_modeling": ("text",),
    "prompt_only": ("prompt",),
}
#: Which formats each use accepts (SFT trains on the chosen side of preference data).
USES: dict[str, tuple[str, ...]] = {
    "sft": ("language_modeling", "prompt_completion", "conversational", "preference", "implicit_preference"),
    "preference": ("preference", "implicit_preference"),
    "prompt": ("prompt_only", "prompt_completion", "conversational", "preference", "implicit_preference"),
}
ROLES = frozenset({"system", "user", "assistant", "tool"})
#: Fields that hold a model's answer: as messages, they must end with a non-empty assistant message.
ANSWER_FIELDS = frozenset({"completion", "chosen", "rejected", "messages"})
STRING_ONLY_FIELDS = frozenset({"text"})
MESSAGES_ONLY_FIELDS = frozenset({"messages"})

Records = datasets.Dataset | Sequence[dict[str, Any]]
#: How ranked responses become pairs when a config (an older recorded one) has no `data.rankings` node.
DEFAULT_RANKINGS = {"pairs": "all", "ties": "drop"}


def _expected() -> str:
    return "; ".join(f"{name}: {', '.join(fields)}" for name, fields in FORMAT_FIELDS.items())


# ---------------------------------------------------------------------------------------------------- loading
def looks_local(source: str) -> bool:
    """A local path (relative, absolute or a file name with a data suffix) rather than a hub dataset id."""
    return source.startswith(("./", "../", "/", "~")) or Path(source).suffix.lower() in FILE_BUILDERS


def _pick_split(table: Any, split: str | None, source: str) -> datasets.Dataset:
    """One split out of a DatasetDict: the named one, or the only one there is."""
    if isinstance(table, datasets.Dataset):
        if split not in (None, "train"):
            raise DatasetValidationError(f"{source}: a saved Dataset has no split {split!r}; pass split=None")
        return table
    if split is None and len(table) == 1:
        return next(iter(table.values()))
    if split not in table:
        raise DatasetValidationError(f"{source}: choose a split with split=...; available: {sorted(table)}")
    return table[split]


def _first_line(err: BaseException) -> str:
    """An exception as `Type: first line`; datasets' generic wrapper is replaced by the cause it wraps."""
    while type(err).__name__ == "DatasetGenerationError" and (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _decode_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streamed; a line that is not UTF-8 fails naming line and byte."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DatasetValidationError(
                    f"{path}: line {number} is not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`"
                ) from err
            yield number, line


def _check_json_lines(path: Path, lines: list[tuple[int, str]]) -> str | None:
    """The first problem of a JSON Lines file (one object per line), or None."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number} is not valid JSON ({err.msg}: column {err.colno}); is the file truncated?"
        if not isinstance(row, dict):
            return f"line {number}: expected one JSON object per line, got {type(row).__name__}"
    return None


def _check_text_file(path: Path, builder: str) -> None:
    """Readable, UTF-8, not empty, and (JSON) parseable: fail naming the line instead of a datasets traceback."""
    lines = list(_decode_lines(path))
    if not any(line.strip() for _, line in lines):
        raise DatasetValidationError(f"{path}: the file is empty; fill it with rows in a standard format")
    if builder != "json":
        return
    problem = _check_json_lines(path, lines)
    if problem and path.suffix.lower() == ".json":  # a .json file may also be one JSON document (a list of rows)
        try:
            json.loads("".join(line for _, line in lines))
            return
        except json.JSONDecodeError as err:
            if lines[0][1].lstrip().startswith("["):
                problem = f"line {err.lineno} is not valid JSON ({err.msg}: column {err.colno}); is the file truncated?"
    if problem:
        raise DatasetValidationError(f"{path}: {problem}")


def _check_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception as err:  # not Parquet, or cut short (the footer holds the schema)
        raise DatasetValidationError(
            f"{path}: not a readable Parquet file ({_first_line(err)}); is it truncated or another format?"
        ) from err


def _load_file(path: Path, split: str | None) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetValidationError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)} "
            "or a folder written by Dataset.save_to_disk"
        )
    if not os.access(path, os.R_OK):
        raise DatasetValidationError(f"{path}: the file is not readable (permissions); fix them, e.g. chmod +r")
    if path.stat().st_size == 0:
        raise DatasetValidationError(f"{path}: the file is empty (0 bytes); fill it with rows in a standard format")
    if builder == "parquet":
        _check_parquet(path)
    else:
        _check_text_file(path, builder)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split=split or "train")
    except Exception as err:  # malformed CSV/Parquet, or columns whose type changes between rows
        raise DatasetValidationError(f"{path}: could not be read as {builder}: {_first_line(err)}") from err


def _load_dataset(source: str, name: str | None, split: str | None) -> datasets.Dataset:
    """`datasets.load_dataset` for a hub id or a local data folder; without a split, take the only one."""
    try:
        table = datasets.load_dataset(source, name, split=split)
    except Exception as err:  # unknown id, offline without a cached copy, unknown split or config name
        offline = " (offline: HF_DATASETS_OFFLINE=1)" if datasets.config.HF_DATASETS_OFFLINE else ""
        raise DatasetValidationError(
            f"{source}: could not be loaded as a hub dataset or data folder{offline}: {_first_line(err)}"
        ) from err
    return table if split is not None else _pick_split(table, None, source)


def load_table(source: str, split: str | None = None, name: str | None = None) -> datasets.Dataset:
    """Load one table from a local file, a `save_to_disk` folder, a local data folder or the Hugging Face hub.

    Local files go to the `datasets` builder of their extension (json/jsonl, parquet, csv) and have one split,
    "train" (slices such as "train[:100]" work). Anything that does not look like a local path is a hub id,
    loaded with `datasets.load_dataset(source, name, split=split)`. A local-looking path that does not exist
    raises DatasetValidationError rather than a confusing hub lookup.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, split)
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
            return _pick_split(datasets.load_from_disk(str(path)), split, source)
        return _load_dataset(str(path), name, split)
    if looks_local(source):
        raise DatasetValidationError(
            f"{source}: no such file or folder (cwd {os.getcwd()}); give an existing .jsonl/.json/.parquet/"
            ".csv file, a save_to_disk folder, or a hub dataset id such as 'trl-lib/ultrafeedback_binarized'"
        )
    return _load_dataset(source, name, split)


# ------------------------------------------------------------------------------------------ format detection
def _columns_of(records: Records) -> list[str]:
    if isinstance(records, datasets.Dataset):
        return list(records.column_names)
    if not isinstance(records, Sequence) or isinstance(records, str | bytes):
        raise DatasetValidationError(f"expected a Dataset or a list of dicts, got {type(records).__name__}")
    return sorted(set().union(*(row.keys() for row in records))) if records else []


def detect_format(columns: Iterable[str], source: str) -> str:
    """The standard format a set of columns is in (a key of FORMAT_FIELDS); the most specific one wins."""
    cols = set(columns)
    for one, other in (("chosen", "rejected"), ("rejected", "chosen")):
        if one in cols and other not in cols:
            raise DatasetValidationError(
                f"{source}: has a '{one}' column but no '{other}' column; preference data needs "
                f"'chosen' and 'rejected' (and usually 'prompt'). Columns found: {sorted(cols)}"
            )
    if "completion" in cols and "prompt" not in cols:
        raise DatasetValidationError(
            f"{source}: has a 'completion' column but no 'prompt' column. Columns found: {sorted(cols)}"
        )
    for fmt, fields in FORMAT_FIELDS.items():
        if set(fields) <= cols:
            return fmt
    raise DatasetValidationError(
        f"{source}: no standard dataset format in columns {sorted(cols)}. Expected one of: {_expected()}. "
        "Rename the columns (e.g. Dataset.rename_column) to match."
    )


def _column_values(records: Records, fields: Sequence[str]) -> dict[str, list[Any]]:
    if isinstance(records, datasets.Dataset):
        return records.select_columns(list(fields)).to_dict()
    return {f: [row.get(f) for row in records] for f in fields}


# ------------------------------------------------------------------------------------------------ validation
def _check_messages(value: Any, where: str, answer: bool) -> None:
    """A conversation: a non-empty list of {role, content} dicts; an answer ends with an assistant message."""
    if not isinstance(value, list) or not value:
        raise DatasetValidationError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise DatasetValidationError(f"{where}, message {j}: expected a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise DatasetValidationError(f"{where}, message {j}: has no 'role' (one of {sorted(ROLES)})")
        if role not in ROLES:
            raise DatasetValidationError(f"{where}, message {j}: unknown role {role!r}; use {sorted(ROLES)}")
        if not isinstance(content, str):
            raise DatasetValidationError(
                f"{where}, message {j}: 'content' must be a string, got {type(content).__name__}"
            )
    if answer and (value[-1]["role"] != "assistant" or not value[-1]["content"].strip()):
        raise DatasetValidationError(f"{where}: the last message must be a non-empty 'assistant' message")


def _kind(value: Any, where: str, field: str) -> str:
    """'string' or 'messages': how a field is written; set by row 0 and then required of every row."""
    if isinstance(value, str) and field not in MESSAGES_ONLY_FIELDS:
        return "string"
    if isinstance(value, list) and field not in STRING_ONLY_FIELDS:
        return "messages"
    wanted = {"text": "a string", "messages": "a list of {role, content} messages"}.get(
        field, "a string or a list of {role, content} messages"
    )
    raise DatasetValidationError(f"{where}: expected {wanted}, got {type(value).__name__} ({value!r:.60})")


def _check_column(values: list[Any], field: str, source: str) -> str:
    """Check every row of one field; returns its kind."""
    kind = _kind(values[0], f"{source}: row 0, field '{field}'", field)
    for i, value in enumerate(values):
        where = f"{source}: row {i}, field '{field}'"
        if kind == "messages":
            _check_messages(value, where, field in ANSWER_FIELDS)
        elif not isinstance(value, str):
            raise DatasetValidationError(f"{where}: expected a string like row 0, got {type(value).__name__}")
        elif not value.strip():
            raise DatasetValidationError(f"{where}: empty string; drop the row or fill in the field")
    return kind


def _check_pairs(columns: dict[str, list[Any]], fmt: str, source: str) -> None:
    """Preference pairs must differ, and implicit ones must share a prompt."""
    chosen, rejected = columns["chosen"], columns["rejected"]
    same = [i for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)) if c == r]
    if len(same) == len(chosen):
        raise DatasetValidationError(
            f"{source}: 'chosen' == 'rejected' in every row; the two columns must hold the preferred and the "
            "dispreferred answer"
        )
    if same:
        log.warning("%s: %d of %d pairs have chosen == rejected (first: row %d); they will be dropped",
                    source, len(same), len(chosen), same[0])  # fmt: skip
    if fmt == "implicit_preference":
        for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
            if c != r and not extract_shared_prompt(c, r)[0]:
                raise DatasetValidationError(
                    f"{source}: row {i}: 'chosen' and 'rejected' share no leading prompt; add a 'prompt' "
                    "column (explicit format: prompt, chosen, rejected)"
                )


def _prompt_inside_answers(records: Records, fmt: str, source: str) -> str:
    """A string `prompt` next to conversational chosen/rejected (e.g. UltraFeedback) means the conversations
    already hold the prompt: treat the data as implicit-prompt pairs, as TRL's `maybe_extract_prompt` does."""
    if fmt != "preference" or len(records) == 0:
        return fmt
    head = records.select(range(1)) if isinstance(records, datasets.Dataset) else records[:1]
    first = _column_values(head, ("prompt", "chosen"))
    if isinstance(first["prompt"][0], str) and isinstance(first["chosen"][0], list):
        log.info("%s: string 'prompt' with conversational 'chosen'/'rejected': using the shared leading "
                 "messages of chosen/rejected as the prompt", source)  # fmt: skip
        return "implicit_preference"
    return fmt


def validate_records(records: Records, source: str, use: str) -> str:
    """Check that `records` can serve `use` ("sft", "preference" or "prompt"); returns the detected format.

    Raises DatasetValidationError naming `source`, the missing column or the first bad row and field, and the
    expected columns. Run it before any training.
    """
    if use not in USES:
        raise ValueError(f"unknown use {use!r}; expected one of {sorted(USES)}")
    fmt = _prompt_inside_answers(records, detect_format(_columns_of(records), source), source)
    if fmt not in USES[use]:
        wanted = "; ".join(f"{f}: {', '.join(FORMAT_FIELDS[f])}" for f in USES[use])
        raise DatasetValidationError(
            f"{source}: is in {fmt} format (columns {', '.join(FORMAT_FIELDS[fmt])}), which cannot be used "
            f"for {use}; expected the columns of one of: {wanted}"
        )
    if len(records) == 0:
        raise DatasetValidationError(f"{source}: has no rows")
    fields = FORMAT_FIELDS[fmt]
    columns = _column_values(records, fields)
    kinds = {field: _check_column(columns[field], field, source) for field in fields}
    if len(set(kinds.values())) > 1:
        raise DatasetValidationError(
            f"{source}: fields mix plain strings and message lists ({kinds}); use strings everywhere or "
            "conversations everywhere"
        )
    if "chosen" in fields:
        _check_pairs(columns, fmt, source)
    return fmt


# ------------------------------------------------------------------------------------------------ normalising
#: Turn markers of HH-style transcripts: an implicit prompt ends with the last one the two answers share.
TURN_MARKERS = ("\n\nAssistant:",)


def extract_shared_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit prompt out of a pair: (prompt, chosen answer, rejected answer).

    Conversations: the prompt is the common leading messages (each side keeps at least its last message).
    Strings with turn markers (HH-style "\n\nHuman: …\n\nAssistant: …"): the prompt ends with the last marker
    inside the common prefix, so two answers that both start "I think" keep it. Other strings: the common prefix
    cut back to a whitespace boundary, so answers start with a space and never split a word. An empty prompt
    means the pair shares none.
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    shared = os.path.commonprefix([chosen, rejected])
    cut = max(shared.rfind(marker) + len(marker) if marker in shared else -1 for marker in TURN_MARKERS)
    if cut > 0 and chosen[cut:].strip() and rejected[cut:].strip():
        return chosen[:cut], chosen[cut:], rejected[cut:]
    j = len(shared)
    while j > 0 and not (chosen[j - 1].isspace() and chosen[j - 1 :].strip() and rejected[j - 1 :].strip()):
        j -= 1
    j = max(j - 1, 0)
    return chosen[:j], chosen[j:], rejected[j:]


def _explicit_pairs(records: Records, fmt: str) -> dict[str, list[Any]]:
    if fmt == "preference":
        return _column_values(records, FORMAT_FIELDS[fmt])
    columns = _column_values(records, FORMAT_FIELDS[fmt])
    pairs = zip(columns["chosen"], columns["rejected"], strict=True)
    triples = [extract_shared_prompt(c, r) for c, r in pairs]
    return {key: [t[k] for t in triples] for k, key in enumerate(("prompt", "chosen", "rejected"))}


def _subset(records: Records, fields: Sequence[str]) -> datasets.Dataset:
    if isinstance(records, datasets.Dataset):
        return records.select_columns(list(fields))
    return datasets.Dataset.from_dict(_column_values(records, fields))


def to_sft_records(records: Records, source: str) -> datasets.Dataset:
    """Validate and normalise for SFT: `text`, `messages` or `prompt`/`completion` (the chosen side of pairs).

    Extra columns are dropped. Prompt/completion data trains on the completion only in TRL's SFTTrainer.
    """
    fmt = validate_records(records, source, "sft")
    if fmt in ("language_modeling", "prompt_completion", "conversational"):
        return _subset(records, FORMAT_FIELDS[fmt])
    pairs = _explicit_pairs(records, fmt)
    return datasets.Dataset.from_dict({"prompt": pairs["prompt"], "completion": pairs["chosen"]})


def to_preference_records(records: Records, source: str) -> datasets.Dataset:
    """Validate and normalise preference pairs to explicit `prompt`/`chosen`/`rejected` (strings or messages).

    An implicit prompt is split out of chosen/rejected (for conversations: the common leading messages);
    pairs with chosen == rejected carry no preference and are dropped (validation logs how many).
    """
    fmt = validate_records(records, source, "preference")
    pairs = _explicit_pairs(records, fmt)
    if "annotator" in _columns_of(records):  # who labelled each pair (rankings from several annotators)
        pairs["annotator"] = _column_values(records, ("annotator",))["annotator"]
    keep = [i for i, (c, r) in enumerate(zip(pairs["chosen"], pairs["rejected"], strict=True)) if c != r]
    return datasets.Dataset.from_dict({key: [values[i] for i in keep] for key, values in pairs.items()})


def to_prompt_records(records: Records, source: str) -> datasets.Dataset:
    """Validate and extract prompts (`prompt` only) for on-policy RL, from any format that has prompts.

    Preference data gives its (explicit or implicit) prompts; conversations give every message before the
    last assistant answer.
    """
    fmt = validate_records(records, source, "prompt")
    if fmt in ("preference", "implicit_preference"):
        return datasets.Dataset.from_dict({"prompt": _explicit_pairs(records, fmt)["prompt"]})
    if fmt != "conversational":
        return _subset(records, ("prompt",))
    prompts = [messages[:-1] for messages in _column_values(records, ("messages",))["messages"]]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise DatasetValidationError(
                f"{source}: row {i}, field 'messages': has no message before the assistant answer to use "
                "as a prompt"
            )
    return datasets.Dataset.from_dict({"prompt": prompts})


NORMALISERS = {"sft": to_sft_records, "preference": to_preference_records, "prompt": to_prompt_records}


def load_records(source: str, split: str | None, name: str | None, use: str) -> datasets.Dataset:
    """Load a table (see `load_table`), validate it for `use` (sft, preference, prompt) and normalise it."""
    if use not in NORMALISERS:
        raise ValueError(f"unknown use {use!r}; expected one of {sorted(NORMALISERS)}")
    label = source if split is None else f"{source} (split {split})"
    return NORMALISERS[use](load_table(source, split, name), label)


def train_eval_split(records: Records, eval_size: int | float, seed: int) -> tuple[Records, Records]:
    """Split into (train, eval), deterministically from `seed`; rows keep their original order in each part.

    `eval_size` is a row count (int) or a fraction in (0, 1) (float); both parts must be non-empty.
    """
    n = len(records)
    if isinstance(eval_size, float):
        if not 0.0 < eval_size < 1.0:
            raise ValueError(f"eval_size as a fraction must lie in (0, 1), got {eval_size}")
        eval_size = max(1, round(eval_size * n))
    if not 0 < eval_size < n:
        raise ValueError(f"cannot split {n} rows into a non-empty train part and {eval_size} eval rows")
    order = np.random.default_rng(seed).permutation(n)
    eval_idx, train_idx = sorted(order[:eval_size].tolist()), sorted(order[eval_size:].tolist())
    if isinstance(records, datasets.Dataset):
        return records.select(train_idx), records.select(eval_idx)
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


def sample_rows(records: Records, n: int, seed: int) -> Records:
    """At most `n` rows: a random subset, deterministic from `seed`, in original order (to try big data)."""
    if len(records) <= n:
        return records
    return train_eval_split(records, n, seed)[1]


def _read_node(node: dict[str, Any], max_samples: int | None, seed: int) -> tuple[datasets.Dataset, str]:
    """Load one {path, name, split} config node and cap its rows; returns the table and its label for errors."""
    label = node["path"] if node["split"] is None else f"{node['path']} (split {node['split']})"
    table = load_table(node["path"], node["split"], node["name"])
    if max_samples is not None:
        table = sample_rows(table, max_samples, seed)
    return table, label


def _normalise(table: Records, label: str, use: str, rankings: RankingSettings) -> datasets.Dataset:
    """Validate and normalise a table for `use`; ranked responses become pairs, demos or prompts first."""
    if is_ranking(_columns_of(table)):
        rows = table.to_list() if isinstance(table, datasets.Dataset) else list(table)
        try:
            if use == "preference":
                table = rankings_to_pairs(rows, rankings, label)
            else:
                table = best_responses(rows, label) if use == "sft" else [{"prompt": r["prompt"]} for r in rows]
        except ValueError as err:
            raise DatasetValidationError(str(err)) from err
        if not table:
            raise DatasetValidationError(f"{label}: its rankings give no pairs (every ranking is one tie?): rank the "
                                         "responses differently, or keep ties with data.rankings.ties=both")
    return NORMALISERS[use](table, label)


def _load_node(node: dict[str, Any], use: str, max_samples: int | None, seed: int,
               rankings: RankingSettings) -> datasets.Dataset:
    """Load one {path, name, split} config node, cap its rows, validate and normalise it for `use`."""
    table, label = _read_node(node, max_samples, seed)
    return _normalise(table, label, use, rankings)


@contextmanager
def _field(name: str) -> Iterator[None]:
    """Prefix a DatasetValidationError raised inside with the config field it concerns (e.g. `data.sft`)."""
    try:
        yield
    except DatasetValidationError as err:
        raise DatasetValidationError(f"`{name}`: {err}") from err


def _held_out(records: Records, fraction: int | float, seed: int, node: dict[str, Any],
              name: str) -> tuple[Records, Records]:
    """train_eval_split, failing with the field, file and fix when the split leaves either part empty."""
    try:
        return train_eval_split(records, fraction, seed)
    except ValueError as err:
        raise DatasetValidationError(
            f"`{name}`: {node['path']}: {len(records)} row(s) cannot be split into train and eval with "
            f"`data.eval_fraction` = {fraction!r}: add rows, change data.eval_fraction, or give a separate "
            "evaluation set"
        ) from err


def _preference_splits(
    cfg: dict[str, Any], rankings: RankingSettings
) -> tuple[datasets.Dataset, datasets.Dataset, tuple[datasets.Dataset, datasets.Dataset] | None]:
    """Training and held-out pairs; for rankings held out here, also their prompts, each ranked prompt once (its
    pairs repeat it). Rankings are held out whole, so no prompt has pairs on both sides."""
    seed, cap, fraction, node = cfg["seed"], cfg["max_samples"], cfg["eval_fraction"], cfg["preference"]
    with _field("data.preference"):
        table, label = _read_node(node, cap, seed)
    if cfg["preference_eval"] is None and is_ranking(_columns_of(table)):
        parts = _held_out(table, fraction, seed, node, "data.preference")
        with _field("data.preference"):
            train, held = (_normalise(part, label, "preference", rankings) for part in parts)
            prompts = tuple(_normalise(part, label, "prompt", rankings) for part in parts)
        return train, held, prompts  # type: ignore[return-value]
    with _field("data.preference"):
        preference = _normalise(table, label, "preference", rankings)
    if cfg["preference_eval"] is None:
        return (*_held_out(preference, fraction, seed, node, "data.preference"), None)
    with _field("data.preference_eval"):
        return preference, _load_node(cfg["preference_eval"], "preference", cap, seed, rankings), None


def load_file_splits(cfg: dict[str, Any]) -> dict[str, datasets.Dataset]:
    """Every split of a user-data config (conf/data/files.yaml): sft, preference(_eval), (eval_)prompts.

    `cfg` holds {path, name, split} nodes `sft`, `preference` and optional `preference_eval` / `prompts`,
    plus `eval_fraction`, `max_samples` and `seed`. Without `preference_eval`, `eval_fraction` of the pairs is
    held out; without `prompts`, RL prompts come from the training pairs and evaluation prompts from the
    held-out pairs; with `prompts`, `eval_fraction` of them is held out. Everything is validated here; errors
    name the config node (`data.sft`, …) and the file. Ranked responses become pairs as `rankings` says.
    """
    seed, cap, fraction = cfg["seed"], cfg["max_samples"], cfg["eval_fraction"]
    rankings = RankingSettings.from_config(cfg.get("rankings") or DEFAULT_RANKINGS)
    with _field("data.sft"):
        sft = _load_node(cfg["sft"], "sft", cap, seed, rankings)
    preference, preference_eval, ranked_prompts = _preference_splits(cfg, rankings)
    if cfg["prompts"] is not None:
        with _field("data.prompts"):
            all_prompts = _load_node(cfg["prompts"], "prompt", cap, seed, rankings)
        prompts, eval_prompts = _held_out(all_prompts, fraction, seed, cfg["prompts"], "data.prompts")
    elif ranked_prompts is not None:
        prompts, eval_prompts = ranked_prompts
    else:
        with _field("data.preference"):
            prompts = to_prompt_records(preference, "preference prompts")
            eval_prompts = to_prompt_records(preference_eval, "preference_eval prompts")
    return {
        "sft": sft,
        "preference": preference,
        "preference_eval": preference_eval,
        "prompts": prompts,
        "eval_prompts": eval_prompts,
    }
