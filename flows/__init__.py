"""Prefect flows and tasks that orchestrate alignflow's stages (components/ holds the stage code itself).

Prefect reads its settings at import time, so the quiet, reliable defaults measured in NOTES-stack are set here,
before anything imports prefect; a user's own environment still wins. Prefect's home (its database) and the
Hugging Face datasets cache go under ALIGNFLOW_ROOT with everything else alignflow writes, so one store can be
moved, backed up or deleted as a unit. A Prefect server already running where `prefect server start` listens by
default (or at ALIGNFLOW_PREFECT_SERVER; `none` turns the search off) is used instead of starting a temporary one
(6-20 s per process), so its UI shows the runs too.
"""

import atexit
import gc
import logging
import os
import warnings
from pathlib import Path

_STATE = Path(os.environ.get("ALIGNFLOW_ROOT", ".")).expanduser().resolve() / ".alignflow"
# At exit, skip the interpreter's cyclic garbage collection of the ML libraries' object graph: it took ~1.7 s per
# process here, after every atexit hook had run (objects are still released; their owners' hooks close files).
atexit.register(gc.freeze)
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # its server does not create the folder
os.environ.setdefault("HF_DATASETS_CACHE", str(_STATE / "hf_datasets"))



def _running_prefect_server(url: str) -> str | None:
    """`url` when a Prefect server answers there (a refused port costs well under a millisecond), else None."""
    import json
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    if url.lower() in ("", "none"):
        return None
    where = urlsplit(url)
    try:
        with socket.create_connection((where.hostname or "127.0.0.1", where.port or 80), timeout=0.05):
            pass
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=1) as answer:
            return url if json.loads(answer.read()) is True else None
    except (OSError, ValueError):
        return None


if "PREFECT_API_URL" not in os.environ:
    _found = _running_prefect_server(os.environ.get("ALIGNFLOW_PREFECT_SERVER", "http://127.0.0.1:4200/api"))
    if _found:
        os.environ["PREFECT_API_URL"] = _found
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its telemetry caused "database is locked"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 2 processes need > 20 s
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_HTTPX_LEVEL", "WARNING")
# alignflow's log lines (progress, summary) also go to the Prefect run's logs: Prefect attaches its API handler
# (not a console handler: the terminal prints each line once) to these loggers; outside a run it drops them quietly.
_extra = [n for n in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if n.strip()]
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(dict.fromkeys([*_extra, "alignflow"]))
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
if logging.getLogger("alignflow").level == logging.NOTSET:  # a served run has no Hydra to set INFO on the root
    logging.getLogger("alignflow").setLevel(logging.INFO)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # alignflow prints its own progress per stage
os.environ.setdefault("TQDM_DISABLE", "1")  # trainers' own bars (e.g. DPO's "Computing reference log probs")
warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator.*")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. the expected "score.weight MISSING" load report
