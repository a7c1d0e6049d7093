"""Process lifecycle: nothing alignflow starts outlives it, and a polite stop ends runs like an error does.

Prefect runs flows without a configured server by starting a temporary one as a child process, stopped by an
`atexit` hook. A SIGTERM (the default action skips atexit) or a SIGKILL of the main process used to leave that
server running with no parent. Here SIGTERM becomes `SystemExit`, so runs end FAILED and atexit hooks run, and
the temporary server is started with the kernel's parent-death signal, so it stops even after a SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from functools import partial

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask the kernel to SIGTERM it when its parent dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the atexit hook and SIGTERM handling still apply


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def tie_children_to_process() -> None:
    """SIGTERM → SystemExit, and Prefect's temporary server dies with this process (call once, at start-up)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not sys.platform.startswith("linux") or os.environ.get("PREFECT_API_URL"):
        return  # a configured server: no temporary one to tie (and no need to import Prefect's server code)
    from prefect.server.api.server import SubprocessASGIServer

    if SubprocessASGIServer._instances.get(None) is not None:
        return  # a server is already registered (a test harness, or a second call)

    class TiedServer(SubprocessASGIServer):
        """Prefect's temporary server, started with the parent-death signal set."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            popen = subprocess.Popen
            subprocess.Popen = partial(popen, preexec_fn=_die_with_parent)  # only for this one spawn
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    TiedServer()  # registers itself as the instance Prefect's clients use (the port-None singleton)
