"""An OpenAI-compatible chat-completions endpoint as a pairwise constitution judge, asked in both orders
(conf/judge/openai_compatible.yaml).

Works with any server speaking `POST {base_url}/chat/completions` (OpenAI, vLLM, llama.cpp, TGI…). The API key
is read from the environment variable named by `api_key_env` at call time and only ever sent as a Bearer header:
it is not stored on the judge nor part of the fingerprint. A server may echo what it was sent (error bodies,
replies, headers), so every text that leaves this module goes through `REDACTOR`: the records of this module's
logger and of its httpx/httpcore client (a `logging.Filter`, so a new log line cannot forget it), `JudgeError`
messages and the replies kept in `Verdict.raw`. Requests run on a thread pool of `concurrency` workers sharing one
httpx client; each has a timeout and up to `max_retries` retries with exponential backoff (a 429's `Retry-After`
is honoured). Unparseable replies are retried too; a pair that still fails raises `JudgeError` naming the judge,
the pair index and the last problem.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from components.judges.base import (
    JudgeError,
    Principle,
    Verdict,
    check_lengths,
    check_number,
    combine_orders,
    fingerprint_of,
    render_constitution,
)

logger = logging.getLogger(__name__)

MASK = "***"
MIN_KEY_PIECE = 8  # an echoed run of the key this long is masked too (excerpts cut keys short)
_CREDENTIAL = re.compile(  # a credential header or parameter's value, whoever's key it is
    r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]token)([\"']?\s*[:=]\s*[\"']?)"
    r"(?:(?:bearer|basic|token)\s+)?[^\s\"',;&})\]]+"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;&})\]]+")
_URL_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")  # https://user:secret@host/v1


def _key_spans(text: str, key: str) -> Iterable[tuple[int, int]]:
    """Where `text` holds the key or a run of at least MIN_KEY_PIECE characters of it (leftmost, longest)."""
    if len(key) < MIN_KEY_PIECE:
        yield from ((m.start(), m.end()) for m in re.finditer(re.escape(key), text))
        return
    i = 0
    while i + MIN_KEY_PIECE <= len(text):
        if text[i : i + MIN_KEY_PIECE] not in key:
            i += 1
            continue
        j = i + MIN_KEY_PIECE
        while j < len(text) and text[i : j + 1] in key:
            j += 1
        yield i, j
        i = j


def redact(text: str, keys: Iterable[str]) -> str:
    """`text` with each key, any echoed piece of one (>= MIN_KEY_PIECE chars), credential header/parameter values
    (`Authorization: …`, `Bearer …`, `api_key=…`) and URL user-info replaced by MASK."""
    parts, end = [], 0
    for start, stop in sorted(span for key in keys if key for span in _key_spans(text, key)):
        if start >= end:  # overlapping spans (two keys) share one mask
            parts.append(text[end:start] + MASK)
        end = max(end, stop)
    text = "".join(parts) + text[end:]
    text = _CREDENTIAL.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    return _URL_USERINFO.sub(f"{MASK}@", _BEARER.sub(lambda m: f"{m[1]}{MASK}", text))


class KeyRedactor(logging.Filter):
    """Redacts the keys of every HTTP judge in this process from log records and texts.

    It remembers the names of the environment variables holding keys (each judge `watch`es its `api_key_env`),
    never the keys: their current values are read when a text is redacted. As a filter it rewrites a record's
    message (arguments, exception and stack text folded in) before any handler sees it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._env_names: set[str] = set()
        self._lock = threading.Lock()

    def watch(self, env_name: str | None) -> None:
        """Redact the value of `env_name` from now on (None: nothing to watch)."""
        if env_name:
            with self._lock:
                self._env_names.add(env_name)

    def redact(self, text: str) -> str:
        """`redact` with the current values of the watched variables."""
        with self._lock:
            names = sorted(self._env_names)
        return redact(text, [os.environ.get(name, "") for name in names])

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format: keep both, redacted
            text = f"{record.msg} {record.args!r}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            text += "\n" + record.stack_info
        record.msg, record.args = self.redact(text), None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


REDACTOR = KeyRedactor()
REDACTED_LOGGERS = (__name__, "httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2")  # judge, client
for _logger_name in REDACTED_LOGGERS:
    logging.getLogger(_logger_name).addFilter(REDACTOR)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
SWAPPED = {"a": "b", "b": "a", "tie": "tie"}  # a label given in the (b, a) order, mapped back to the pair
_FILLER = frozenset({"response", "answer", "verdict", "final", "the", "is", "it", "s"})


@dataclass
class HTTPSettings:
    """Settings of the HTTP judge (all from conf/judge/openai_compatible.yaml); checks itself."""

    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str
    api_key_env: str | None  # name of the environment variable holding the key; None: send no key
    system: str | None  # optional system message
    template: str  # user message with {constitution}, {prompt}, {response_a}, {response_b}
    temperature: float
    max_tokens: int
    timeout: float  # seconds per request
    max_retries: int  # retries per request after the first attempt
    backoff_base: float  # seconds before the first retry; doubles each retry
    backoff_max: float  # cap on one backoff wait (a server's Retry-After is honoured as given)
    concurrency: int  # requests in flight at once

    def __post_init__(self) -> None:
        check_number("temperature", self.temperature, at_least=0)
        check_number("max_tokens", self.max_tokens, at_least=1, integer=True)
        check_number("timeout", self.timeout, above=0)
        check_number("max_retries", self.max_retries, at_least=0, integer=True)
        check_number("backoff_base", self.backoff_base, at_least=0)
        check_number("backoff_max", self.backoff_max, at_least=0)
        check_number("concurrency", self.concurrency, at_least=1, integer=True)


class _Retry(Exception):
    """A failed attempt worth retrying, with the server's requested wait if it gave one."""

    def __init__(self, problem: str, wait: float | None) -> None:
        super().__init__(problem)
        self.problem, self.wait = problem, wait


def parse_label(reply: str) -> str | None:
    """'a', 'b' or 'tie' from a reply such as "A", "**B**.", "Response A", "Verdict: tie"; None otherwise."""
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    if not lines:
        return None
    words = [w for w in re.sub(r"[^a-z]+", " ", lines[0].lower()).split() if w not in _FILLER]
    return words[0] if len(words) == 1 and words[0] in ("a", "b", "tie") else None


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def read_api_key(env_name: str | None, judge_name: str) -> str | None:
    """The API key from the environment variable `env_name` (None: no key); a named but unset variable fails."""
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ValueError(f"{judge_name}: environment variable {env_name} (api_key_env) is not set")
    return key


def make_client(settings: HTTPSettings, key: str | None) -> httpx.Client:
    """One httpx client for a judge call: base URL, Bearer header, per-request timeout, `concurrency` connections."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=settings.concurrency)
    base = settings.base_url.rstrip("/")
    return httpx.Client(base_url=base, headers=headers, timeout=settings.timeout, limits=limits)


def attempt_verdict(client: httpx.Client, body: dict[str, Any], timeout: float) -> tuple[str, str]:
    """One request: (label, reply text); `_Retry` for a timeout, retryable status or unreadable reply;
    RuntimeError for any other client or server error (retrying would not help)."""
    try:
        response = client.post("/chat/completions", json=body)
    except httpx.TimeoutException:
        raise _Retry(f"no reply within the {timeout}s timeout", None) from None
    except httpx.TransportError as exc:
        raise _Retry(f"transport error: {type(exc).__name__}", None) from None
    if response.status_code in RETRYABLE_STATUS:
        raise _Retry(f"HTTP {response.status_code}", retry_after_seconds(response.headers.get("retry-after")))
    if response.status_code >= 400:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    try:
        reply = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retry(f"malformed response body {response.text[:80]!r}", None) from None
    label = parse_label(reply) if isinstance(reply, str) else None
    if label is None:
        raise _Retry(f"unparseable verdict {str(reply)[:80]!r}", None)
    return label, reply


def ask_with_retries(
    client: httpx.Client, body: dict[str, Any], settings: HTTPSettings, judge_name: str, index: int
) -> tuple[str, str]:
    """One verdict request with retries and exponential backoff (a server's Retry-After wins); `JudgeError` naming
    the judge, the pair and the last problem when every attempt failed."""
    for attempt in range(settings.max_retries + 1):
        try:
            return attempt_verdict(client, body, settings.timeout)
        except _Retry as retry:
            problem = retry.problem
            if attempt == settings.max_retries:
                break
            backoff = min(settings.backoff_max, settings.backoff_base * 2**attempt)
            wait = retry.wait if retry.wait is not None else backoff
            logger.warning(
                "%s: pair %d attempt %d failed (%s); retry in %.2fs", judge_name, index, attempt + 1, problem, wait
            )
            time.sleep(wait)
        except RuntimeError as exc:
            raise JudgeError(judge_name, index, str(exc)) from None
    raise JudgeError(judge_name, index, f"{problem} (after {settings.max_retries + 1} attempts)")


def two_order_verdict(first: tuple[str, str], second: tuple[str, str]) -> Verdict:
    """Verdict from the (a, b) reply and the (b, a) reply, each a (label, text) pair; both texts kept (redacted)
    in `raw`."""
    preference, consistent = combine_orders(first[0], SWAPPED[second[0]])
    raw = json.dumps({"order_ab": REDACTOR.redact(first[1]), "order_ba": REDACTOR.redact(second[1])})
    return Verdict(preference, position_consistent=consistent, raw=raw)


class HTTPJudge:
    """Pairwise judge behind an OpenAI-compatible endpoint; each pair is asked in both orders."""

    def __init__(self, settings: HTTPSettings, principles: list[Principle]) -> None:
        """Keep the settings and render the constitution; no connection is opened until `judge`."""
        self.settings, self.principles = settings, principles
        self._constitution = render_constitution(principles)
        self.name = f"openai_compatible({settings.model} @ {redact(settings.base_url, ())})"
        REDACTOR.watch(settings.api_key_env)

    def request_body(self, prompt: str, first: str, second: str) -> dict[str, Any]:
        """The chat-completions request asking whether `first` (A) or `second` (B) better follows the constitution."""
        s = self.settings
        user = s.template.format(constitution=self._constitution, prompt=prompt, response_a=first, response_b=second)
        system = [{"role": "system", "content": s.system}] if s.system else []
        messages = [*system, {"role": "user", "content": user}]
        return {"model": s.model, "messages": messages, "temperature": s.temperature, "max_tokens": s.max_tokens}

    def judge(self, prompts: list[str], a: list[str], b: list[str]) -> list[Verdict]:
        """Ask each pair as (a, b) and (b, a), `concurrency` requests at a time; consistent labels win."""
        check_lengths(prompts, a, b)
        bodies = {
            (i, order): self.request_body(p, *((x, y) if order == 0 else (y, x)))
            for i, (p, x, y) in enumerate(zip(prompts, a, b, strict=True))
            for order in (0, 1)
        }
        key = read_api_key(self.settings.api_key_env, self.name)
        with make_client(self.settings, key) as client:
            pool = ThreadPoolExecutor(max_workers=self.settings.concurrency)
            try:
                futures = {
                    job: pool.submit(ask_with_retries, client, body, self.settings, self.name, job[0])
                    for job, body in bodies.items()
                }
                replies = {job: future.result() for job, future in futures.items()}
            except JudgeError as exc:  # a server may echo what it was sent: never let the key into the message
                raise JudgeError(exc.judge, exc.index, REDACTOR.redact(exc.problem)) from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        return [two_order_verdict(replies[(i, 0)], replies[(i, 1)]) for i in range(len(prompts))]

    def fingerprint(self) -> str:
        """Endpoint, model, prompt, sampling and principles: never the key, timeouts, retries or concurrency."""
        s = self.settings
        payload = {
            "base_url": s.base_url.rstrip("/"),
            "model": s.model,
            "system": s.system,
            "template": s.template,
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
            "principles": [asdict(p) for p in self.principles],
        }
        return fingerprint_of("openai_compatible", payload, __name__)
