"""Process lifecycle: nothing alignflow starts outlives it, and a polite stop ends runs like an error does.

Prefect runs flows without a configured server by starting a temporary one as a child process, stopped by an
`atexit` hook. A SIGTERM (the default action skips atexit) or a SIGKILL of the main process used to leave that
server running with no parent. Here SIGTERM becomes `SystemExit`, so runs end FAILED and atexit hooks run, and
the temporary server is started with the kernel's parent-death signal, so it stops even after a SIGKILL.

A signal handler's exception is lost when the signal lands while Python runs a finaliser or weakref callback
(e.g. SQLAlchemy's): the interpreter prints "Exception ignored in …" and the pipeline went on to the end with exit
status 0. An unraisable-exception hook sends such a swallowed stop signal again, a moment later.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_signal(exc: BaseException | None) -> int | None:
    """The signal behind a stop exception: ours (SystemExit 128+n), Prefect's TerminationSignal, or Ctrl-C."""
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(exc, SystemExit) and exc.code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        return int(exc.code) - 128
    signum = getattr(exc, "signal", None)  # prefect.exceptions.TerminationSignal, without importing Prefect
    return signum if type(exc).__name__ == "TerminationSignal" and isinstance(signum, int) else None


def _resend_swallowed_stops(previous: Callable[[Any], object]) -> Callable[[Any], None]:
    """An unraisable-exception hook: report as `previous` does, and send a stop signal whose exception a finaliser
    swallowed again (from a timer thread, so the handler next runs in ordinary code, where its exception unwinds
    the run)."""

    def hook(unraisable: Any) -> None:
        previous(unraisable)
        signum = _stop_signal(unraisable.exc_value)
        if signum is not None:
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()

    return hook


def tie_children_to_process() -> None:
    """SIGTERM → SystemExit, a stop signal is never swallowed, and Prefect's temporary server dies with this
    process (call once, at start-up; it adopts a server process `flows.temporary_server.spawn` started)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not getattr(sys.unraisablehook, "alignflow_resends_stops", False):
        sys.unraisablehook = _resend_swallowed_stops(sys.unraisablehook)
        sys.unraisablehook.alignflow_resends_stops = True
    if not sys.platform.startswith("linux") or os.environ.get("PREFECT_API_URL"):
        return  # a configured server: no temporary one to tie (and no need to import Prefect's server code)
    from prefect.server.api.server import SubprocessASGIServer

    if SubprocessASGIServer._instances.get(None) is not None:
        return  # a server is already registered (a test harness, or a second call)
    from flows.temporary_server import tied_server

    tied_server()
