"""Prefect's temporary server: tied to this process, started early, on a database that is already migrated.

Without a configured server, every alignflow process runs Prefect's temporary server: a uvicorn child that imports
Prefect's server and migrates its SQLite database before it answers. Measured on a 2-core CPU: ~17 s on a new
store (its 116 migrations) and ~7 s on an existing one, all of it before the first stage ran. Here:

- `spawn()` starts that child at once, with the command and environment Prefect's `SubprocessASGIServer` gives it
  (a test compares them), without importing Prefect's server code. The CLI calls it once the config's values
  pass, so the server boots while the slower checks and imports run; `cancel()` stops it if one of them fails.
- `tied_server()` registers the `SubprocessASGIServer` that Prefect's clients use: it adopts the early child, or
  starts one with the kernel's parent-death signal (so it stops even after a SIGKILL of this process), and
  Prefect's own `start()` waits, as ever, until it answers.
- A new store's database starts as a copy of a migrated one without runs, kept per Prefect version and migration
  set under `$XDG_CACHE_HOME/alignflow/` (default `~/.cache`); the first store this machine migrates provides it.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prefect
from prefect.settings import get_current_settings

#: Tables that hold runs: a database with rows in any of them is not a template for a new store.
RUN_TABLES = ("flow", "flow_run", "task_run", "log", "artifact", "deployment")
SQLITE = "sqlite+aiosqlite:///"


def template_path() -> Path:
    """Where the migrated, run-free database for this Prefect version and migration set is kept."""
    migrations = sorted(p.name for p in (prefect.__module_path__ / "server/database/_migrations/versions/sqlite")
                        .glob("*.py"))
    digest = hashlib.sha256("\n".join(migrations).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return cache / "alignflow" / f"prefect-{prefect.__version__}-{digest}.db"


def database_file() -> Path | None:
    """The SQLite file Prefect's server will use; None for another database (PostgreSQL, in memory)."""
    url = get_current_settings().server.database.connection_url.get_secret_value()
    if not url.startswith(SQLITE) or ":memory:" in url:
        return None
    return Path(url.removeprefix(SQLITE))


def seed(database: Path, template: Path) -> bool:
    """Copy `template` to `database` where neither it nor another process's database exists yet; True if done."""
    if database.exists() or not template.is_file():
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    partial_copy = database.with_name(f".{database.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, partial_copy)
        os.link(partial_copy, database)  # fails, copying nothing, where a server created the file meanwhile
        return True
    except OSError:
        return False
    finally:
        partial_copy.unlink(missing_ok=True)


def keep_template(database: Path, template: Path) -> bool:
    """Save a consistent copy of `database` (SQLite's backup) as `template` if it is migrated and holds no runs
    (another process may share the new store and have started one); best effort. True when kept."""
    partial_copy = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(partial_copy)) as copy:
            source.backup(copy)
            migrated = copy.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
            runs = sum(copy.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] for table in RUN_TABLES)
        if migrated and runs == 0:
            os.replace(partial_copy, template)
            return True
        return False
    except (OSError, sqlite3.Error):
        return False
    finally:
        partial_copy.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask the kernel to SIGTERM it when its parent dies (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the atexit hook and SIGTERM handling still apply


def server_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The command line and environment Prefect's `SubprocessASGIServer` starts its server with."""
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    return command, env


def start_process(port: int) -> tuple[subprocess.Popen[Any], Path | None]:
    """Prefect's server process on `port`, tied to this thread's life, its database seeded from the template
    where the store is new; also the new database it migrates itself when there is no template yet."""
    database, new_store = database_file(), None
    if database is not None and not database.exists():
        template = template_path()
        if not seed(database, template) and not template.is_file():
            new_store = database
    command, env = server_command(port)
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent), new_store


@dataclass
class Early:
    """A server process started before Prefect's clients need it."""

    process: subprocess.Popen[Any]
    port: int
    new_store: Path | None


_early: Early | None = None


def spawn() -> None:
    """Start the temporary server's process now (from the main thread: the parent-death signal follows the
    spawning thread) where this process will need one: no server configured and none registered yet."""
    global _early
    settings = get_current_settings()
    registered = getattr(sys.modules.get("prefect.server.api.server"), "SubprocessASGIServer", None)
    if (_early is not None or settings.api.url or not settings.server.ephemeral.enabled
            or not sys.platform.startswith("linux") or (registered and registered._instances.get(None))):
        return
    with closing(socket.socket()) as probe:  # a free port; Prefect's start() moves on should it be taken
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process, new_store = start_process(port)
    _early = Early(process, port, new_store)
    atexit.register(cancel)


def cancel() -> None:
    """Stop the early process if Prefect did not adopt it (a check failed)."""
    global _early
    early, _early = _early, None
    if early is not None and early.process.poll() is None:
        early.process.terminate()
        try:
            early.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            early.process.kill()
            early.process.wait()


def tied_server() -> Any:
    """Register, as the instance Prefect's clients use, a `SubprocessASGIServer` that adopts the early process or
    starts its own tied to this process, and keeps a new store's database as template once it answers."""
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        def start(self, timeout: int | None = None) -> None:
            super().start(timeout)
            new_store, self.new_store = getattr(self, "new_store", None), None
            if new_store is not None:
                keep_template(new_store, template_path())

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            global _early
            if _early is not None and _early.port == self.port and _early.process.poll() is None:
                early, _early = _early, None
                self.new_store = early.new_store
                return early.process
            cancel()  # an early process on another port, or one that exited: not left behind
            process, self.new_store = start_process(self.port)
            return process

    server = TiedServer()  # the port-None singleton that get_client() starts
    if _early is not None:
        server.port = _early.port
    return server
