"""AI judges: verdict format, the MiniLM constitution judge against the embedded gold, the local-LM judge's
two-order plumbing, the reward-model judge, and the HTTP judge against a local misbehaving server."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from components.judges import build_judge
from components.judges.base import (
    Judge,
    JudgeError,
    Verdict,
    combine_orders,
    fingerprint_of,
    label_of,
    parse_principles,
)
from components.judges.constitution import ConstitutionJudge, ConstitutionSettings
from components.judges.llm import LLMJudge, LLMSettings, label_token_ids
from components.judges.openai_compatible import (
    REDACTOR,
    HTTPJudge,
    HTTPSettings,
    parse_label,
    redact,
    retry_after_seconds,
)
from components.judges.reward_model import RewardModelSettings
from components.modeling import build_base_checkpoint, load_reward_model, load_tokenizer, train_tokenizer
from components.review_task import build_embedded_splits, gold_rewards

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
JUDGES = ROOT / "components" / "judges"
PRINCIPLES = yaml.safe_load((CONF / "constitution" / "default.yaml").read_text())["principles"]
TINY_ARCH = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 1024}
GOOD = " the screen is bright and sharp. the battery lasts two days. overall it is excellent."
BAD = " great great great great great great"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ verdicts & helpers
def test_verdict_round_trips_through_json_and_rejects_out_of_range():
    v = Verdict(1.0, scores_a={"helpful": 0.25}, scores_b={"helpful": -0.5}, position_consistent=True, raw="A")
    assert Verdict.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert Verdict.from_dict(Verdict(0.5).to_dict()) == Verdict(0.5)
    with pytest.raises(ValueError, match="preference"):
        Verdict(1.5)


def test_principles_are_validated():
    assert [p.name for p in parse_principles(PRINCIPLES)] == ["helpful", "positive", "coherent"]
    with pytest.raises(ValueError, match="unique"):
        parse_principles([PRINCIPLES[0], PRINCIPLES[0]])
    with pytest.raises(ValueError, match="weight"):
        parse_principles([{**PRINCIPLES[0], "weight": 0}])
    with pytest.raises(ValueError, match="needs name"):
        parse_principles([{"name": "x", "description": "y"}])


def test_orders_combine_into_verdicts():
    assert label_of(0.9, 0.05) == "a" and label_of(0.1, 0.05) == "b" and label_of(0.52, 0.05) == "tie"
    assert combine_orders("a", "a") == (1.0, True)
    assert combine_orders("b", "b") == (0.0, True)
    assert combine_orders("tie", "tie") == (0.5, True)
    assert combine_orders("a", "b") == (0.5, False)  # each order preferred the response shown first
    assert combine_orders("a", "tie") == (0.5, False)


def test_fingerprints_cover_payload_and_code():
    base = fingerprint_of("k", {"model": "m"}, "components.judges.constitution")
    assert base == fingerprint_of("k", {"model": "m"}, "components.judges.constitution") and base.startswith("k-")
    assert base != fingerprint_of("k", {"model": "n"}, "components.judges.constitution")
    assert base != fingerprint_of("k", {"model": "m"}, "components.judges.openai_compatible")  # another's source


def test_unknown_kind_and_bad_settings_fail_naming_the_problem():
    with pytest.raises(ValueError, match="unknown judge kind"):
        build_judge("oracle", {}, PRINCIPLES)
    with pytest.raises(ValueError, match=r"missing \['tie_margin'\].*unknown \['margin'\]"):
        build_judge(
            "reward_model", {"path": "x", "max_length": 8, "batch_size": 2, "margin": 0, "device": "cpu"}, PRINCIPLES
        )


SETTINGS = {
    "constitution": ConstitutionSettings,
    "llm": LLMSettings,
    "openai_compatible": HTTPSettings,
    "reward_model": RewardModelSettings,
}


@pytest.mark.parametrize(
    ("kind", "field", "value", "rule"),
    [
        ("constitution", "tie_margin", -1, "a number >= 0"),
        ("constitution", "batch_size", 0, "an integer >= 1"),
        ("constitution", "max_length", 2.5, "an integer >= 1"),
        ("llm", "tie_margin", 0.5, "a number >= 0 and < 0.5"),
        ("llm", "batch_size", -2, "an integer >= 1"),
        ("openai_compatible", "timeout", 0, "a number > 0"),
        ("openai_compatible", "max_retries", -1, "an integer >= 0"),
        ("openai_compatible", "concurrency", 0, "an integer >= 1"),
        ("openai_compatible", "backoff_base", -0.5, "a number >= 0"),
        ("openai_compatible", "max_tokens", True, "an integer >= 1"),
        ("reward_model", "max_length", 0, "null or an integer >= 1"),
        ("reward_model", "tie_margin", "wide", "a number >= 0"),
    ],
)
def test_settings_check_their_own_values(kind, field, value, rule):
    settings = yaml.safe_load((CONF / "judge" / f"{kind}.yaml").read_text())["settings"]
    SETTINGS[kind](**settings)  # the shipped values pass
    with pytest.raises(ValueError, match=rf"^{field} = {re.escape(repr(value))} is invalid: use {re.escape(rule)}$"):
        SETTINGS[kind](**{**settings, field: value})


def test_reward_model_max_length_may_be_null():
    settings = yaml.safe_load((CONF / "judge" / "reward_model.yaml").read_text())["settings"]
    assert RewardModelSettings(**{**settings, "max_length": None}).max_length is None


# ------------------------------------------------------------------------------------------ package layout
def _judge_imports(path: Path) -> set[str]:
    """`components.judges.*` modules a judges source file imports (absolute or relative), at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "components.judges" + (f".{base}" if base else "")
            found.update({base, *(f"{base}.{a.name}" for a in node.names)})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    modules = {f"components.judges.{f.stem}" for f in JUDGES.glob("*.py") if f.stem != "__init__"}
    return {n for n in found if n in modules or n == "components.judges"}


def test_judge_modules_import_only_base_so_there_is_no_cycle():
    kinds = {f.stem for f in JUDGES.glob("*.py")} - {"__init__", "base"}
    assert kinds == set(SETTINGS)  # one module per conf/judge/<kind>.yaml
    assert {f.stem for f in (CONF / "judge").glob("*.yaml")} == kinds
    assert _judge_imports(JUDGES / "base.py") == set()
    for kind in kinds:
        assert _judge_imports(JUDGES / f"{kind}.py") == {"components.judges.base"}, kind
    # the package imports every judge (lazily, as plain statements) so the stage fingerprint follows them all
    assert {f"components.judges.{k}" for k in kinds} | {"components.judges.base"} <= _judge_imports(
        JUDGES / "__init__.py"
    )


def test_each_judge_module_imports_alone_and_the_package_stays_light():
    """Each judges module imports first in a clean state (a cycle would fail one of them); building no judge
    loads neither torch nor httpx."""
    alone = (
        "import sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'components' or m.startswith('components.')]:\n"
        "        del sys.modules[loaded]\n"
        "    __import__(name)\n"
    )
    modules = sorted(f"components.judges.{f.stem}" for f in JUDGES.glob("*.py") if f.stem != "__init__")
    subprocess.run([sys.executable, "-c", alone, *modules, "components.judges"], cwd=ROOT, check=True, timeout=300)
    light = "import sys\nfrom components.judges import build_judge\nassert not {'torch', 'httpx'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", light], cwd=ROOT, check=True, timeout=120)


def test_no_importlib_in_components():
    offenders = [str(f) for f in (ROOT / "components").rglob("*.py") if "importlib" in f.read_text()]
    assert offenders == []


# --------------------------------------------------------------------------------------- constitution judge
@pytest.fixture(scope="module")
def constitution_judge() -> ConstitutionJudge:
    """The default constitution with the packaged MiniLM, configured as conf/judge/constitution.yaml says."""
    settings = yaml.safe_load((CONF / "judge" / "constitution.yaml").read_text())["settings"]
    return build_judge("constitution", {**settings, "device": "cpu"}, PRINCIPLES)


def test_constitution_judge_agrees_with_the_embedded_gold(constitution_judge):
    rows = build_embedded_splits(0, 0, 200, 0, 0, 0.2, seed=2)["preference_eval"]
    a = [r["chosen"] if i % 2 else r["rejected"] for i, r in enumerate(rows)]  # the better one on both sides
    b = [r["rejected"] if i % 2 else r["chosen"] for i, r in enumerate(rows)]
    verdicts = constitution_judge.judge([r["prompt"] for r in rows], a, b)
    decided = [
        (v, ga, gb)
        for v, ga, gb in zip(verdicts, gold_rewards(a), gold_rewards(b), strict=True)
        if v.preference != 0.5 and ga != gb
    ]
    agreement = sum((v.preference == 1.0) == (ga > gb) for v, ga, gb in decided) / len(decided)
    tie_rate = sum(v.preference == 0.5 for v in verdicts) / len(verdicts)
    assert agreement >= 0.7, agreement  # measured 0.79 here (0.75-0.81 over other seeds); chance is 0.5
    assert tie_rate < 0.2, tie_rate


def test_constitution_judge_is_symmetric_and_keeps_principle_scores(constitution_judge):
    prompts = ["Review of the phone:"] * 3
    a = [GOOD, " the battery is awful and the screen is broken. overall it is useless.", " good."]
    b = [BAD, GOOD, GOOD]
    forward, backward = constitution_judge.judge(prompts, a, b), constitution_judge.judge(prompts, b, a)
    assert [v.preference for v in forward] == [1.0, 0.0, 0.0]  # beats repetition; loses when negative or a fragment
    for f, r in zip(forward, backward, strict=True):
        assert r.preference == 1.0 - f.preference and r.scores_a == f.scores_b
        assert set(f.scores_a) == {"helpful", "positive", "coherent"} and f.position_consistent is None


def test_constitution_fingerprint_tracks_behaviour_only(constitution_judge):
    fp = constitution_judge.fingerprint()
    assert fp == constitution_judge.fingerprint() and fp.startswith("constitution-")
    other = copy.copy(constitution_judge)
    other.settings = dataclasses.replace(constitution_judge.settings, batch_size=7)
    assert other.fingerprint() == fp  # batch size changes speed, not verdicts
    other.settings = dataclasses.replace(constitution_judge.settings, tie_margin=0.2)
    assert other.fingerprint() != fp
    other = copy.copy(constitution_judge)
    other.principles = [dataclasses.replace(constitution_judge.principles[0], weight=9.0)]
    assert other.fingerprint() != fp
    assert isinstance(constitution_judge, Judge)


# --------------------------------------------------------------------------------------- local-LM judge
def _labelled_corpus() -> list[str]:
    words = "Review of the phone kettle screen battery good bad great broken Response Answer A B".split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4 + ["Answer: A", "Answer: B"] * 20
    return texts + [p[k] for p in PRINCIPLES for k in ("description", "violation")] * 4


@pytest.fixture(scope="module")
def tiny_judge_path(tmp_path_factory) -> str:
    """A random tiny GPT-2 whose tokenizer has the labels A and B (it cannot judge; the plumbing is tested)."""
    out = tmp_path_factory.mktemp("tiny_judge")
    return build_base_checkpoint(_labelled_corpus(), TINY_ARCH, vocab_size=300, seed=0, out_dir=out)


@pytest.fixture(scope="module")
def llm_judge(tiny_judge_path) -> LLMJudge:
    settings = yaml.safe_load((CONF / "judge" / "llm.yaml").read_text())["settings"]
    settings.update(model=tiny_judge_path, answer_prefix="\nAnswer:", device="cpu", tie_margin=0.0)
    return build_judge("llm", settings, PRINCIPLES)


def test_llm_judge_asks_both_orders(llm_judge):
    prompts, a, b = ["Review of the phone:"] * 3, [GOOD, " bad.", " good good"], [BAD, GOOD, " great"]
    verdicts = llm_judge.judge(prompts, a, b)
    assert len(verdicts) == 3
    for v in verdicts:
        assert v.preference in (0.0, 0.5, 1.0) and isinstance(v.position_consistent, bool)
        probs = json.loads(v.raw)
        assert 0.0 < probs["p_first_ab"] < 1.0 and 0.0 < probs["p_first_ba"] < 1.0
        assert v.preference == 0.5 or v.position_consistent
    swapped = llm_judge.judge(prompts, b, a)
    assert [s.preference for s in swapped] == [1.0 - v.preference for v in verdicts]


def test_llm_judge_prompt_holds_the_constitution_and_both_responses(llm_judge):
    text = llm_judge.judge_text("Review of the kettle:", " first one.", " second one.")
    assert "helpful" in text and "Each sentence says something new" in text
    assert text.index(" first one.") < text.index(" second one.") and text.endswith("\nAnswer:")


def test_llm_judge_turns_position_bias_into_ties(llm_judge, monkeypatch):
    monkeypatch.setattr(llm_judge, "p_first", lambda texts: [0.9] * len(texts))  # always answers "A"
    verdicts = llm_judge.judge(["p"] * 2, ["x", "y"], ["z", "w"])
    assert [(v.preference, v.position_consistent) for v in verdicts] == [(0.5, False)] * 2
    # a judge that follows content ("good" wins wherever it is shown) is consistent in both orders
    monkeypatch.setattr(llm_judge, "p_first", lambda texts: [0.9 if "A: good" in t else 0.1 for t in texts])
    content_template = "{constitution}\nA:{response_a}\nB:{response_b}"
    monkeypatch.setattr(llm_judge, "settings", dataclasses.replace(llm_judge.settings, template=content_template))
    verdicts = llm_judge.judge(["p"] * 2, [" good", " meh"], [" meh", " good"])
    assert [(v.preference, v.position_consistent) for v in verdicts] == [(1.0, True), (0.0, True)]


def test_label_tokens_must_differ():
    tokenizer = train_tokenizer(["the cat sat on the mat"] * 20, vocab_size=60)  # no capital A or B
    with pytest.raises(ValueError, match="cannot tell the labels"):
        label_token_ids(tokenizer)


# --------------------------------------------------------------------------------------- reward-model judge
@pytest.fixture(scope="module")
def reward_path(tiny_judge_path, tmp_path_factory) -> Path:
    """A sequence-classification checkpoint (random head, seeded) saved with its tokenizer."""
    out = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    load_reward_model(tiny_judge_path).save_pretrained(out)
    load_tokenizer(tiny_judge_path).save_pretrained(out)
    return out


def test_reward_model_judge_follows_score_differences(reward_path, tmp_path):
    settings = {"path": str(reward_path), "max_length": 64, "batch_size": 4, "tie_margin": 0.0, "device": "cpu"}
    judge = build_judge("reward_model", settings, PRINCIPLES)
    a, b = [GOOD, " bad.", " good good"], [BAD, GOOD, " great"]
    verdicts = judge.judge(["Review of the phone:"] * 3, a, b)
    for v in verdicts:
        diff = v.scores_a["reward"] - v.scores_b["reward"]
        assert v.preference == (1.0 if diff > 0 else 0.0 if diff < 0 else 0.5)
    wide = build_judge("reward_model", {**settings, "tie_margin": 1e6}, PRINCIPLES)
    assert {v.preference for v in wide.judge(["p"] * 3, a, b)} == {0.5}
    moved = shutil.copytree(reward_path, tmp_path / "moved")  # same content elsewhere: same fingerprint
    assert (
        build_judge("reward_model", {**settings, "path": str(moved)}, PRINCIPLES).fingerprint() == judge.fingerprint()
    )
    assert wide.fingerprint() != judge.fingerprint()


# --------------------------------------------------------------------------------------------- HTTP judge
class FakeChatServer:
    """A threaded chat-completions server on 127.0.0.1 whose behaviour a test scripts per request number:
    `behave(n, body)` returns (status, headers, reply, delay), `reply` being the assistant's text or a dict sent as
    the whole JSON body (an error object, an echo of the request); `headers[n]` holds request n's headers."""

    def __init__(self, behave) -> None:
        self.behave, self.requests, self.lock = behave, [], threading.Lock()
        self.headers: list[dict[str, str]] = []  # every request's headers, in the order of `requests`
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append((time.monotonic(), self.headers.get("Authorization"), body))
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                status, headers, reply, delay = server.behave(n, body)
                time.sleep(delay)
                with server.lock:
                    server.in_flight -= 1
                message = {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                payload = json.dumps(reply if isinstance(reply, dict) else message).encode()  # a dict: the whole body
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def content_verdict(body) -> str:
    """The right answer: the response containing "good" wins, wherever it is shown."""
    a, b = re.search(r"\nA: (.*)\nB: (.*)\n", body["messages"][-1]["content"]).groups()
    return "A" if "good" in a and "good" not in b else "B" if "good" in b and "good" not in a else "tie"


def correct(n, body):
    return 200, {}, content_verdict(body), 0.0


SECRET = "sk-test-0123456789-secret"


def http_judge(url: str, monkeypatch, **overrides) -> HTTPJudge:
    monkeypatch.setenv("ALIGNFLOW_TEST_JUDGE_KEY", SECRET)
    settings = yaml.safe_load((CONF / "judge" / "openai_compatible.yaml").read_text())["settings"]
    settings.update(
        base_url=url,
        model="fake-judge",
        api_key_env="ALIGNFLOW_TEST_JUDGE_KEY",
        timeout=2.0,
        template="{constitution}\nPrompt: {prompt}\nA: {response_a}\nB: {response_b}\nVerdict?",
        backoff_base=0.01,
        backoff_max=0.05,
        max_retries=2,
        concurrency=1,
    )
    settings.update(overrides)
    return build_judge("openai_compatible", settings, PRINCIPLES)


PAIRS = (["p1", "p2", "p3"], [" good", " bad", " good one"], [" bad", " good", " good two"])


def test_http_judge_asks_both_orders_and_keeps_the_key_secret(monkeypatch):
    with FakeChatServer(correct) as server:
        judge = http_judge(server.url, monkeypatch)
        verdicts = judge.judge(*PAIRS)
    assert [v.preference for v in verdicts] == [1.0, 0.0, 0.5]
    assert all(v.position_consistent for v in verdicts) and json.loads(verdicts[0].raw) == {
        "order_ab": "A",
        "order_ba": "B",
    }
    assert len(server.requests) == 6 and {auth for _, auth, _ in server.requests} == {f"Bearer {SECRET}"}
    assert (
        server.requests[0][2]["model"] == "fake-judge" and "helpful" in server.requests[0][2]["messages"][-1]["content"]
    )
    leaks = [judge.fingerprint(), json.dumps([v.to_dict() for v in verdicts]), repr(vars(judge))]
    assert not any(SECRET in text for text in leaks)


def test_http_fingerprint_ignores_key_and_transport_settings(monkeypatch):
    judge = http_judge("http://127.0.0.1:9/v1", monkeypatch)
    monkeypatch.setenv("ALIGNFLOW_TEST_JUDGE_KEY", "another-key")
    assert (
        http_judge("http://127.0.0.1:9/v1", monkeypatch, concurrency=4, timeout=9.0).fingerprint()
        == judge.fingerprint()
    )
    assert http_judge("http://127.0.0.1:9/v1", monkeypatch, model="other").fingerprint() != judge.fingerprint()


def test_http_judge_position_bias_becomes_ties(monkeypatch):
    with FakeChatServer(lambda n, body: (200, {}, "A", 0.0)) as server:
        verdicts = http_judge(server.url, monkeypatch).judge(*PAIRS)
    assert [(v.preference, v.position_consistent) for v in verdicts] == [(0.5, False)] * 3


def test_http_garbage_is_retried_then_parsed(monkeypatch):
    def garbage_first(n, body):
        return (200, {}, "I think both are lovely", 0.0) if n < 2 else correct(n, body)

    with FakeChatServer(garbage_first) as server:
        verdicts = http_judge(server.url, monkeypatch).judge(*PAIRS)
    assert [v.preference for v in verdicts] == [1.0, 0.0, 0.5] and len(server.requests) == 2 + 6


def test_http_garbage_forever_raises_judge_error(monkeypatch):
    with FakeChatServer(lambda n, body: (200, {}, "Both A and B have merit.", 0.0)) as server:
        with pytest.raises(JudgeError) as caught:
            http_judge(server.url, monkeypatch, max_retries=2).judge(*PAIRS)
    err = caught.value
    assert err.index == 0 and "fake-judge" in err.judge and "unparseable" in str(err) and "3 attempts" in str(err)
    assert len(server.requests) >= 3 and SECRET not in str(err)


def test_http_429_honours_retry_after(monkeypatch):
    def limited(n, body):
        return (429, {"Retry-After": "1"}, "", 0.0) if n == 0 else correct(n, body)

    with FakeChatServer(limited) as server:
        verdicts = http_judge(server.url, monkeypatch, backoff_base=0.01).judge(*PAIRS)
    assert [v.preference for v in verdicts] == [1.0, 0.0, 0.5]
    assert server.requests[1][0] - server.requests[0][0] >= 0.95  # waited as told, not the 0.01 s backoff


def test_http_server_errors_back_off_exponentially(monkeypatch):
    def flaky(n, body):
        return (503, {}, "", 0.0) if n < 3 else correct(n, body)

    with FakeChatServer(flaky) as server:
        http_judge(server.url, monkeypatch, max_retries=3, backoff_base=0.1, backoff_max=1.0).judge(*PAIRS)
    times = [t for t, _, _ in server.requests[:4]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4, gaps


def test_http_timeout_exhausts_retries(monkeypatch):
    with FakeChatServer(lambda n, body: (200, {}, "A", 1.5)) as server:
        start = time.monotonic()
        with pytest.raises(JudgeError, match=r"pair 0: no reply within the 0.2s timeout \(after 2 attempts\)"):
            http_judge(server.url, monkeypatch, timeout=0.2, max_retries=1).judge(*PAIRS)
        assert time.monotonic() - start < 1.4  # gave up on its own timeouts, not the server's delay
        assert len(server.requests) >= 2


def test_http_concurrency_limit_holds(monkeypatch):
    with FakeChatServer(lambda n, body: (*correct(n, body)[:3], 0.1)) as server:
        judge = http_judge(server.url, monkeypatch, concurrency=3)
        judge.judge(["p"] * 6, [" good"] * 6, [" bad"] * 6)
    assert len(server.requests) == 12 and server.max_in_flight == 3


def test_http_client_errors_fail_without_retrying(monkeypatch):
    with FakeChatServer(lambda n, body: (401, {}, "bad key", 0.0)) as server:
        with pytest.raises(JudgeError, match="HTTP 401"):
            http_judge(server.url, monkeypatch, max_retries=3).judge(["p"], ["a"], ["b"])
    bodies = [json.dumps(body) for _, _, body in server.requests]
    assert len(bodies) == len(set(bodies)) <= 2  # each order asked at most once: a 401 is not retried


def key_pieces(key: str, width: int = 8) -> list[str]:
    return [key[i : i + width] for i in range(len(key) - width + 1)]


def test_redact_masks_keys_their_echoed_pieces_and_credential_values():
    assert redact(f"got {SECRET}!", [SECRET]) == "got ***!"
    assert redact(f"cut short: {SECRET[3:14]}", [SECRET]) == "cut short: ***"  # an excerpt's piece of the key
    assert (
        redact(f"{SECRET[:7]} is too short a piece to tell", [SECRET]) == f"{SECRET[:7]} is too short a piece to tell"
    )
    assert redact("both sk-one-1234567 and sk-two-7654321", ["sk-one-1234567", "sk-two-7654321"]) == "both *** and ***"
    assert redact("x sk-one-1234567", ["sk-one-1234567", "one-1234567"]) == "x ***"  # overlapping keys: one mask
    assert redact("the kettle is excellent", [SECRET]) == "the kettle is excellent"
    assert redact('{"Authorization": "Bearer other.token"}', []) == '{"Authorization": "***"}'
    assert redact("proxy-authorization: Basic dXNlcjpwYXNz\r\n", []) == "proxy-authorization: ***\r\n"
    assert redact("(b'x-echo', b'Bearer abc')", []) == "(b'x-echo', b'Bearer ***')"
    assert redact("GET /v1?api_key=abc123&q=1 x-api-key: zz", []) == "GET /v1?api_key=***&q=1 x-api-key: ***"
    assert (
        redact("https://user:pw@host/v1 and http://127.0.0.1:9/v1", [])
        == "https://***@host/v1 and http://127.0.0.1:9/v1"
    )
    assert redact("api_key_env: OPENAI_API_KEY, max_tokens: 5", []) == "api_key_env: OPENAI_API_KEY, max_tokens: 5"


def test_redactor_filter_rewrites_every_record_of_the_judge_logger(monkeypatch, caplog):
    monkeypatch.setenv("ALIGNFLOW_TEST_JUDGE_KEY", SECRET)
    REDACTOR.watch("ALIGNFLOW_TEST_JUDGE_KEY")
    log = logging.getLogger("components.judges.openai_compatible")
    with caplog.at_level(logging.DEBUG, logger=log.name):
        log.debug("sent %s", {"headers": {"auth": SECRET}})
        try:
            raise RuntimeError(f"server said {SECRET[:20]}")
        except RuntimeError:
            log.exception("failed")
        log.info("bad %d format", SECRET)  # would raise inside the filter: kept, redacted
    texts = [r.getMessage() for r in caplog.records] + [caplog.text]
    assert len(caplog.records) == 3 and all(r.exc_info is None for r in caplog.records)
    assert "RuntimeError: server said ***" in texts[1]
    assert not any(piece in text for text in texts for piece in key_pieces(SECRET))


def echo_auth_first(n, body):
    """A proxy's error page with status 200: no choices, the request's Authorization header first."""
    return 200, {}, {"error": {"echo": {"authorization": f"Bearer {SECRET}", "body": body}}}, 0.0


def test_http_echoed_key_is_redacted_from_warnings_errors_and_raw_verdicts(monkeypatch, caplog):
    def then_verdict(n, body):
        return echo_auth_first(n, body) if n < 2 else (200, {}, f"{content_verdict(body)}\n(key {SECRET})", 0.0)

    with caplog.at_level(logging.DEBUG), FakeChatServer(then_verdict) as server:
        verdicts = http_judge(server.url, monkeypatch).judge(*PAIRS)
    assert [v.preference for v in verdicts] == [1.0, 0.0, 0.5] and "(key ***)" in verdicts[0].raw
    warnings = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert len(warnings) == 2 and all(
        "malformed response body" in w and '"authorization": "***"' in w for w in warnings
    )
    with caplog.at_level(logging.DEBUG), FakeChatServer(echo_auth_first) as server:
        with pytest.raises(JudgeError, match="malformed response body") as caught:
            http_judge(server.url, monkeypatch, max_retries=1).judge(*PAIRS)
    texts = [str(caught.value), caplog.text, *(json.dumps(v.to_dict()) for v in verdicts)]
    assert not any(piece in text for text in texts for piece in key_pieces(SECRET))


def test_http_judge_name_hides_url_credentials(monkeypatch):
    judge = http_judge("https://user:pw-123@judge.example/v1", monkeypatch)
    assert judge.name == "openai_compatible(fake-judge @ https://***@judge.example/v1)"


def test_http_missing_key_variable_is_named(monkeypatch):
    judge = http_judge("http://127.0.0.1:9/v1", monkeypatch, api_key_env="ALIGNFLOW_TEST_UNSET_KEY")
    monkeypatch.delenv("ALIGNFLOW_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="ALIGNFLOW_TEST_UNSET_KEY"):
        judge.judge(["p"], ["a"], ["b"])


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("A", "a"),
        ("b.", "b"),
        ("**B**", "b"),
        ("Response A", "a"),
        ("Verdict: tie", "tie"),
        ("Tie.\nBoth ok", "tie"),
        ("The answer is B", "b"),
        ("AB", None),
        ("Both A and B", None),
        ("", None),
        ("A is better", None),
    ],
)
def test_parse_label(reply, label):
    assert parse_label(reply) == label


def test_retry_after_values():
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: go now
    assert retry_after_seconds("soon") is None
