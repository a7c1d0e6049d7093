"""Prefect's temporary server started early, adopted by Prefect, on a database seeded from a template
(flows/temporary_server.py)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

from flows.temporary_server import RUN_TABLES, keep_template, seed, server_command, template_path

REPO = Path(__file__).resolve().parent.parent


def test_the_early_command_is_the_one_prefect_runs():
    """The server `spawn()` starts must be Prefect's own: same command line, same environment."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer(port=8123)
    try:
        with mock.patch("subprocess.Popen") as popen:
            server._run_uvicorn_command()
    finally:
        SubprocessASGIServer._instances.pop(8123, None)
    command, env = server_command(8123)
    assert popen.call_args.kwargs["args"] == command
    assert popen.call_args.kwargs["env"] == env


def _database(path: Path, runs: int) -> Path:
    """A stand-in for Prefect's database: migrated (one alembic version) and `runs` flow runs."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE alembic_version (version_num TEXT)")
        db.execute("INSERT INTO alembic_version VALUES ('abc')")
        for table in RUN_TABLES:
            db.execute(f'CREATE TABLE "{table}" (id TEXT)')
        db.executemany("INSERT INTO flow_run VALUES (?)", [(str(i),) for i in range(runs)])
    return path


def test_only_a_migrated_database_without_runs_becomes_the_template(tmp_path):
    template = tmp_path / "cache" / "prefect.db"
    assert not keep_template(_database(tmp_path / "busy.db", runs=1), template) and not template.exists()
    assert keep_template(_database(tmp_path / "new.db", runs=0), template)
    with sqlite3.connect(template) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("abc",)]
    (tmp_path / "bare.db").touch()  # not migrated
    assert not keep_template(tmp_path / "bare.db", tmp_path / "other.db") and not (tmp_path / "other.db").exists()
    assert sorted(p.name for p in template.parent.iterdir()) == ["prefect.db"]  # no partial copies left


def test_seeding_never_replaces_a_database(tmp_path):
    template = _database(tmp_path / "template.db", runs=0)
    store = tmp_path / "home" / "prefect.db"
    assert seed(store, template) and store.read_bytes() == template.read_bytes()
    store.write_bytes(b"a server's own")
    assert not seed(store, template) and store.read_bytes() == b"a server's own"
    assert not seed(tmp_path / "elsewhere.db", tmp_path / "missing.db")
    assert sorted(p.name for p in store.parent.iterdir()) == ["prefect.db"]


def test_the_template_is_kept_per_prefect_version_under_the_user_cache(monkeypatch, tmp_path):
    import prefect

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = template_path()
    assert path.parent == tmp_path / "alignflow" and path.name.startswith(f"prefect-{prefect.__version__}-")


SCRIPT = """
import json, os, sqlite3, time
os.environ["PREFECT_HOME"] = {home!r}
os.environ["XDG_CACHE_HOME"] = {cache!r}
from flows import temporary_server
from flows.lifecycle import tie_children_to_process
from prefect.server.api.server import SubprocessASGIServer

temporary_server.spawn()
seeded = temporary_server.database_file().exists()  # the server process is still starting up: a copy's doing
early = temporary_server._early.process.pid
tie_children_to_process()  # registers the server Prefect's clients use: it adopts the early process
server = SubprocessASGIServer()
server.start()
adopted = server.server_process.pid
template = temporary_server.template_path()
print(json.dumps({{"early": early, "adopted": adopted, "seeded": seeded, "kept": template.is_file()}}))
"""


def _run(home: Path, cache: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT).format(home=str(home), cache=str(cache))],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prefect_adopts_the_early_server_and_a_new_store_starts_from_the_template(tmp_path):
    """The first new store migrates and provides the template; the next starts from a copy of it."""
    cache = tmp_path / "cache"
    first = _run(tmp_path / "first", cache)
    assert first["adopted"] == first["early"] and not first["seeded"] and first["kept"]
    second = _run(tmp_path / "second", cache)
    assert second["adopted"] == second["early"] and second["seeded"]
    with sqlite3.connect(tmp_path / "second" / "prefect.db") as db:  # seeded: the template's migrated schema
        assert db.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
        assert db.execute("SELECT count(*) FROM flow_run").fetchone() == (0,)


CANCEL = """
import os
os.environ["PREFECT_HOME"] = {home!r}
os.environ["XDG_CACHE_HOME"] = {cache!r}
from flows import temporary_server

temporary_server.spawn()  # as the CLI does once the config's values pass
process = temporary_server._early.process
temporary_server.cancel()  # as the CLI does when a later check fails
print(process.poll() is not None, temporary_server._early is None)
"""


def test_a_server_no_flow_adopted_is_stopped(tmp_path):
    script = textwrap.dedent(CANCEL).format(home=str(tmp_path / "home"), cache=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]
