"""The judge's API key never leaves the process that read it.

A fake chat-completions endpoint echoes every request (its Authorization header, all headers, the body) back in
429/500 error bodies, in a 200 error object with no choices, in an unparseable reply and beside the final
verdict. The RLAIF flow runs end to end against it, then once more against an endpoint that only ever echoes (so
the label stage fails). The planted key, or any 12-character piece of it (an echo truncated to an excerpt), must
then be absent from the console, the log records, every file under ALIGNFLOW_ROOT (artifacts, judge cache, MLflow
database and artifacts, Prefect results) and the Prefect database of the test harness.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from components.judges.base import JudgeError
from flows.pipeline import alignflow
from tests.test_judges import FakeChatServer

KEY_ENV = "ALIGNFLOW_TEST_SECRET_KEY"
JUDGE_LOGGER = "components.judges.openai_compatible"
Behave = Callable[[int, dict[str, Any]], tuple[int, dict[str, str], Any, float]]

pytestmark = pytest.mark.usefixtures("one_thread")


def pieces(key: str, width: int = 12) -> list[bytes]:
    """The key and every `width`-character window of it: an echo cut short in an excerpt is still a leak."""
    return [key.encode()] + [key[i : i + width].encode() for i in range(len(key) - width + 1)]


def leaks(data: bytes, key: str) -> bool:
    return any(piece in data for piece in pieces(key))


def longer_wins(body: dict[str, Any]) -> str:
    text = body["messages"][-1]["content"]
    a, b = re.search(r"Response A: (.*?)\n\nResponse B: (.*?)\n\n", text, re.S).groups()
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"


def echoing_endpoint(holder: dict[str, FakeChatServer], always_echo: bool = False) -> Behave:
    """Each distinct request is answered, attempt by attempt: 429/500 with the request echoed in the error body
    and its Authorization header in a response header, a 200
    error object (no choices) starting with the Authorization header, an unparseable reply quoting it, then (unless
    `always_echo`, which keeps answering the 200 error object) a verdict with the header quoted on its second line."""
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def behave(n: int, body: dict[str, Any]) -> tuple[int, dict[str, str], Any, float]:
        server = holder["server"]
        auth = server.requests[n][1]
        echo = {"authorization": auth, "headers": server.headers[n], "body": body}
        with lock:
            k = attempts[json.dumps(body, sort_keys=True)] = attempts.get(json.dumps(body, sort_keys=True), -1) + 1
        if always_echo or k == 1:
            return 200, {}, {"error": {"echo": echo}}, 0.0
        if k == 0:  # the key also comes back in a response header (httpcore logs those at DEBUG)
            if n % 2:
                headers = {"Retry-After": "0", "X-Echo-Authorization": auth}
                return 429, headers, {"error": {"message": "rate limited", "echo": echo}}, 0.0
            return 500, {"X-Echo-Authorization": auth}, {"error": {"message": "overloaded", "echo": echo}}, 0.0
        if k == 2:
            return 200, {}, f"Cannot judge. You sent Authorization: {auth}", 0.0
        return 200, {}, f"{longer_wins(body)}\n(request had Authorization: {auth})", 0.0

    return behave


def prefect_files() -> list[Path]:
    """The harness's Prefect database (with its -wal/-shm companions) and Prefect's local result storage."""
    import prefect.settings

    url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    db = Path(url.split(":///", 1)[1])
    assert db.is_file(), url
    storage = Path(prefect.settings.PREFECT_LOCAL_STORAGE_PATH.value())
    stored = [f for f in storage.rglob("*") if f.is_file()] if storage.is_dir() else []
    return [f for f in db.parent.glob(db.name + "*") if f.is_file()] + stored


def flush_prefect_logs() -> None:
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)


def test_judge_key_never_reaches_console_logs_stores_or_prefect(prefect_harness, store, monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    key = f"sk-alignflow-{secrets.token_hex(20)}"
    monkeypatch.setenv(KEY_ENV, key)
    start = time.time()

    def args(url: str) -> list[str]:
        return [
            "experiment=smoke", "pipeline=rlaif", "judge=openai_compatible", f"judge.settings.base_url={url}",
            "judge.settings.model=fake", f"judge.settings.api_key_env={KEY_ENV}", "judge.settings.backoff_base=0.01",
            "judge.settings.backoff_max=0.02", "judge.settings.max_retries=3", "label.sampling.n_pairs=16",
            "label.batch_size=8", "rl.total_updates=2", "sft.args.num_train_epochs=1",
            "reward.args.num_train_epochs=1", "data.embedded.n_sft=200", "data.embedded.n_preference=100",
            "data.embedded.n_eval_preference=50", "data.embedded.n_prompts=64", "data.embedded.n_eval_prompts=32",
            "eval.max_prompts=32",
        ]  # fmt: skip

    holder: dict[str, FakeChatServer] = {}
    with FakeChatServer(echoing_endpoint(holder)) as server:
        holder["server"] = server
        summary = alignflow(overrides=args(server.url))
    assert [s["stage"] for s in summary["stages"]] == ["data", "sft", "label", "reward", "ppo", "eval", "register"]
    broken: dict[str, FakeChatServer] = {}
    with FakeChatServer(echoing_endpoint(broken, always_echo=True)) as failing:  # another URL: label reruns
        broken["server"] = failing
        with pytest.raises(JudgeError, match="failed on pair") as caught:
            alignflow(overrides=args(failing.url))
    flush_prefect_logs()

    # The test can fail: the key was sent and echoed, and retries were logged.
    assert {auth for _, auth, _ in server.requests + failing.requests} == {f"Bearer {key}"}
    retries = [r for r in caplog.records if r.name == JUDGE_LOGGER and "retry in" in r.getMessage()]
    assert len(retries) >= 3 * 2 * 16 // 2, len(retries)  # 3 per request; at least half the 16 pairs survive
    out, err = capfd.readouterr()
    texts = {"stdout": out, "stderr": err, "caplog": caplog.text, "exception": str(caught.value)}
    texts |= {f"record {i} ({r.name})": r.getMessage() for i, r in enumerate(caplog.records)}
    assert not [name for name, text in texts.items() if leaks(text.encode(), key)]
    files = [f for f in store.rglob("*") if f.is_file()]
    prefect = [f for f in prefect_files() if f.stat().st_mtime >= start - 1]
    assert not [str(f) for f in files + prefect if leaks(f.read_bytes(), key)]

    # ... and it looked where the echoes went: redacted warnings and verdicts, the stores and the Prefect database.
    assert any("malformed response body" in r.getMessage() and "***" in r.getMessage() for r in retries)
    assert any(r.name.startswith("httpcore") and "Bearer ***" in r.getMessage() for r in caplog.records)
    cache = list(store.rglob("judge_cache/*.jsonl"))
    assert cache and all(b"***" in f.read_bytes() for f in cache)  # the verdicts' raw replies, redacted
    assert any(f.name == "mlflow.db" for f in files) and any(f.name == "config.yaml" for f in files)
    database = b"".join(f.read_bytes() for f in prefect)
    assert KEY_ENV.encode() in database and b"failed on pair" in database  # the flow's parameters and failure
