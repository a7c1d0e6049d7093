"""A stop signal that lands inside a finaliser still stops the process (flows/lifecycle.py).

Found in CI: SIGTERM during the SFT stage arrived while SQLAlchemy ran a weakref callback; Python printed
"Exception ignored in: <function _collection_gced …> … TerminationSignal" and the pipeline ran to the end, exit 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prefect.exceptions import TerminationSignal

from flows.lifecycle import _stop_signal

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import os, signal, time
os.environ["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # a configured server: no temporary one to tie
from flows.lifecycle import tie_children_to_process
tie_children_to_process()
if {prefect_bridge}:  # what Prefect's flow engine installs while a flow runs
    from prefect.exceptions import TerminationSignal
    def bridge(signum, frame):
        raise TerminationSignal(signal=signum)
    signal.signal(signal.SIGTERM, bridge)

class Finaliser:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):
            pass  # the handler runs here, inside a finaliser, where its exception is only printed

Finaliser()
print("swallowed", flush=True)
time.sleep(10)
print("survived", flush=True)
"""


@pytest.mark.parametrize("prefect_bridge", [False, True], ids=["alignflow-handler", "prefect-bridge"])
def test_a_sigterm_swallowed_by_a_finaliser_is_sent_again(prefect_bridge):
    script = textwrap.dedent(SCRIPT).format(prefect_bridge=prefect_bridge)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in proc.stderr  # the first delivery was lost, as in the CI run
    assert "swallowed" in proc.stdout and "survived" not in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == (1 if prefect_bridge else 128 + signal.SIGTERM), proc.stderr[-2000:]


def test_stop_signal_names_only_stop_exceptions():
    assert _stop_signal(SystemExit(128 + signal.SIGTERM)) == signal.SIGTERM
    assert _stop_signal(TerminationSignal(signal=signal.SIGTERM)) == signal.SIGTERM
    assert _stop_signal(KeyboardInterrupt()) == signal.SIGINT
    assert _stop_signal(SystemExit(0)) is None and _stop_signal(SystemExit(2)) is None
    assert _stop_signal(ValueError("not a stop")) is None and _stop_signal(None) is None
