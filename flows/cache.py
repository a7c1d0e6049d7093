"""Stage keys: the cache and the artifact store are one thing.

key = sha256(stage name, resolved stage config, upstream keys, fingerprint of the component source it calls).
A stage writes to `<artifact_dir>/<stage>/<key>/` and, only after success, an atomic `DONE` marker holding its
result. No marker means "not done": the directory is wiped and the stage runs again; a marked one is never
rewritten. The component fingerprint follows `components.*` imports, so editing components/ppo.py changes the
PPO key (and through upstream keys everything after it) but nothing before it.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

DONE = "DONE"
KEY_LENGTH = 16


def read_source(module: str) -> bytes:
    """Source bytes of an importable module (raises ModuleNotFoundError naming it when it does not exist)."""
    spec = find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"stage component module {module!r} not found")
    return Path(spec.origin).read_bytes()


@cache
def _component_imports(module: str) -> tuple[str, ...]:
    """Names of the `components.*` modules that `module` imports (absolute or relative)."""
    tree = ast.parse(read_source(module))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside the components package
                base = "components" + (f".{base}" if base else "")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("components.") and find_spec_safe(n))
    return tuple(sorted(found - {module}))


def find_spec_safe(name: str) -> bool:
    """True when `name` is an importable module (not a function imported from one)."""
    try:
        return find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def module_closure(modules: list[str]) -> set[str]:
    """`modules` plus every components module they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_component_imports(name))
    return seen


def source_fingerprint(modules: list[str]) -> str:
    """Hash of the source of `modules` and of every components module they import."""
    digest = hashlib.sha256()
    for name in sorted(module_closure(modules)):
        digest.update(name.encode() + b"\0" + read_source(name))
    return digest.hexdigest()


def stage_key(stage: str, config: Any, upstream: dict[str, str], modules: list[str]) -> str:
    """Content key of one stage: its name, resolved config, upstream keys and component fingerprint."""
    payload = json.dumps(
        {"stage": stage, "config": config, "upstream": upstream, "source": source_fingerprint(modules)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def read_done(stage_dir: Path) -> dict[str, Any] | None:
    """The stored result of a finished stage, or None when it never finished (or its directory is gone)."""
    marker = Path(stage_dir) / DONE
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def write_done(stage_dir: Path, result: dict[str, Any]) -> None:
    """Mark a stage finished, atomically: the marker appears whole or not at all."""
    tmp = Path(stage_dir) / f".{DONE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    os.replace(tmp, Path(stage_dir) / DONE)


def fresh_stage_dir(stage_dir: Path) -> Path:
    """Empty directory for a stage about to run: leftovers of an interrupted attempt are removed."""
    stage_dir = Path(stage_dir)
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    return stage_dir


@contextmanager
def stage_lock(stage_dir: Path) -> Iterator[None]:
    """Exclusive lock on one stage key across processes (parallel sweep jobs): one builds, the others wait and
    then find its DONE marker. The OS releases it if the holder dies, so a crash never leaves it stuck."""
    lock_path = Path(stage_dir).with_name(Path(stage_dir).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
