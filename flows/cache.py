"""Stage keys: the cache and the artifact store are one thing, keyed by content.

key = sha256(stage name, resolved stage config, digests of the outside inputs it reads (local files by their
bytes, hub repos by their revision), the manifest digests of its upstream stages' outputs, fingerprint of the
component source it calls). A stage writes to `<artifact_dir>/<stage>/<key>/` and, only after success, a manifest
of its outputs (path, size, sha256) inside an atomic `DONE` marker holding its result. No marker means "not
done": the directory is wiped and the stage runs again; a marked one is never rewritten. On reuse the outputs are
checked against the manifest (sizes always, hashes when asked), so a damaged stage is rebuilt, not trusted. The
component fingerprint follows `components.*` imports, so editing components/ppo.py changes the PPO key (and
through the manifests whatever PPO then produces differently) but nothing before it.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import logging
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
CHUNK = 1 << 20
UNTRACKED = ("trainer",)  # scratch folders in a stage directory that are not outputs (TRL's output_dir)
log = logging.getLogger("alignflow")


class DamagedStage(RuntimeError):
    """A finished stage whose marker or outputs no longer match what it recorded; the message says which file."""


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
    """True when `name` is a module of the components package (not a function imported from one), found by its
    file: asking importlib about `components.x.f` would import `components.x` (torch and all) to look inside."""
    parts = name.split(".")
    if parts[0] != "components":
        return False
    path = _components_dir().joinpath(*parts[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@cache
def _components_dir() -> Path:
    spec = find_spec("components")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the components package is not importable")
    return Path(next(iter(spec.submodule_search_locations)))


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


def stage_key(stage: str, config: Any, upstream: dict[str, str], modules: list[str],
              inputs: dict[str, str] | None = None) -> str:
    """Content key of one stage: its name, resolved config, the digests of its upstream outputs and outside
    inputs, and its component fingerprint."""
    payload = {"stage": stage, "config": config, "upstream": upstream, "source": source_fingerprint(modules)}
    if inputs:
        payload["inputs"] = inputs
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LENGTH]


# ------------------------------------------------------------------------------------------- content digests
def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _output_files(stage_dir: Path) -> list[Path]:
    """Every file a stage produced: all but the marker, dotfiles and scratch folders."""
    files = []
    for path in sorted(stage_dir.rglob("*")):
        rel = path.relative_to(stage_dir)
        if path.is_file() and rel.parts[0] not in UNTRACKED and not any(p.startswith(".") for p in rel.parts) \
                and rel.name != DONE:
            files.append(path)
    return files


def build_manifest(stage_dir: Path) -> dict[str, Any]:
    """{files: {relative path: {size, sha256}}, digest}: what a stage produced, and one hash over all of it."""
    stage_dir = Path(stage_dir)
    files = {str(p.relative_to(stage_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _output_files(stage_dir)}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"files": files, "digest": digest}


def check_outputs(stage_dir: Path, manifest: dict[str, Any], full: bool) -> None:
    """Raise DamagedStage naming the first output that is missing, has another size or (if `full`) other bytes."""
    for rel, entry in sorted(manifest["files"].items()):
        path = Path(stage_dir) / rel
        if not path.is_file():
            raise DamagedStage(f"{path} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise DamagedStage(f"{path} has {size} bytes, {entry['size']} were written")
        if full and file_sha256(path) != entry["sha256"]:
            raise DamagedStage(f"{path} has other bytes than were written (sha256 differs)")


def input_digest(source: str, memo: DigestMemo | None = None) -> str:
    """Content identity of an outside input: a local file or folder by its bytes, a hub repo by its revision
    (resolved online; `hub:<id>` when it cannot be resolved, e.g. offline)."""
    path = Path(source).expanduser()
    if path.is_file():
        return memo.file(path) if memo else file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
            sha = memo.file(f) if memo else file_sha256(f)
            digest.update(f"{f.relative_to(path)}\0{sha}\n".encode())
        return digest.hexdigest()
    return hub_revision(source)


def hub_revision(repo_id: str) -> str:
    """The commit a hub id resolves to now (model or dataset repo), or `hub:<id>` when that cannot be known."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return f"hub:{repo_id}"
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        for kind in ("model", "dataset"):
            try:
                return api.repo_info(repo_id, repo_type=kind, timeout=10).sha or f"hub:{repo_id}"
            except Exception:  # noqa: BLE001 - not this kind, not reachable, or not a repo at all
                continue
    except ImportError:
        pass
    return f"hub:{repo_id}"


class DigestMemo:
    """sha256 of large input files remembered by (path, size, mtime), so a 10 GB checkpoint is hashed once, not
    on every run; a file edited in place gets a new mtime and is hashed again."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def file(self, path: Path) -> str:
        stat = path.stat()
        ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if ident not in self.known:
            self.known[ident] = file_sha256(path)
            self._save()
        return self.known[ident]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.known))
        os.replace(tmp, self.path)


def read_done(stage_dir: Path, verify: str = "sizes") -> dict[str, Any] | None:
    """The stored result of a finished stage, or None when it never finished (or its directory is gone).

    Raises DamagedStage when the marker is unreadable or the outputs differ from its manifest (`verify`: `sizes`
    checks every file's presence and size, `hashes` also its sha256, `none` nothing).
    """
    marker = Path(stage_dir) / DONE
    if not marker.is_file():
        return None
    try:
        result = json.loads(marker.read_text())
        manifest = result["manifest"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedStage(f"{marker} is unreadable ({type(err).__name__}: {err})") from err
    if verify != "none":
        check_outputs(stage_dir, manifest, full=verify == "hashes")
    return result


def finished(stage: str, stage_dir: Path, verify: str) -> dict[str, Any] | None:
    """`read_done`, but a damaged stage is reported in one line and treated as not finished (it is rebuilt)."""
    try:
        return read_done(stage_dir, verify)
    except DamagedStage as err:
        log.warning("[%s] stored result is damaged: %s; rebuilding the stage", stage, err)
        return None


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
