"""The human feedback loop in the flow: send a round to Label Studio, wait the Prefect way, train on what came back.

`gather_feedback` is three steps: the `feedback_request` stage (sample, choose, send), `wait_for_rankings` (the flow
run pauses with `pause_flow_run(wait_for_input=…)` until resumed, or polls Label Studio), and the `feedback` stage
keyed by the content of the rankings it trains on. `alignflow-feedback resume <flow-run-id>` resumes a paused run
(so does the Prefect UI's Resume button); `alignflow-feedback simulate` ranks open tasks as simulated annotators.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from prefect.input import RunInput

from flows.bodies import label_store_path, label_studio_project

log = logging.getLogger("alignflow")


class RankingsReady(RunInput):
    """What resuming a paused feedback round says: `proceed` trains on the rankings given so far even when fewer
    than `feedback.wait.min_labelled` of the round's items are ranked (otherwise the run checks and waits again)."""

    proceed: bool = False


def gather_feedback(pipe: Any, **upstream: dict[str, Any]) -> dict[str, Any]:
    """Run one feedback round for `pipe` (a flows.pipeline.Pipeline): request, wait, collect."""
    request = pipe.run("feedback_request", **upstream)
    labels = wait_for_rankings(pipe.cfg["feedback"], request)
    return pipe.run("feedback", data=upstream["data"], labels=labels)


def wait_for_rankings(cfg: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """Wait until `feedback.wait.min_labelled` of the round's items are ranked; store the rankings; return the
    snapshot of every ranking of this round's candidates as an upstream result (path and content digest)."""
    from components.feedback import LabelStore

    asked = json.loads((Path(request["path"]) / "request.json").read_text())
    store = LabelStore(label_store_path({"dir": request["path"]}))
    wait, sent = cfg["wait"], set(asked["sent"])
    deadline = time.monotonic() + wait["timeout_hours"] * 3600
    project, said = label_studio_project(cfg["label_studio"]), None
    while True:
        store.add(project.rankings(sent))
        ranked = len(sent & store.labelled_keys())
        if not sent or ranked >= wait["min_labelled"] * len(sent):
            break
        if ranked != said:  # a line when the count moves, not every poll
            log.info("[feedback] %d of %d items ranked in Label Studio (%s/projects/%d): waiting", ranked,
                     len(sent), asked["url"].rstrip("/"), asked["project_id"])
            said = ranked
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"only {ranked} of {len(sent)} items were ranked within feedback.wait.timeout_hours"
                               f" = {wait['timeout_hours']}: rerun to keep waiting (rankings given are kept)")
        if wait["mode"] == "pause":
            if _pause(remaining, wait["poll_seconds"]).proceed:
                store.add(project.rankings(sent))
                break
        else:
            time.sleep(min(wait["poll_seconds"], remaining))
    return _snapshot(store, set(asked["candidates"]), store.path.parent / "snapshots")


def _pause(remaining: float, poll_seconds: int) -> RankingsReady:
    """Pause this flow run until someone resumes it (CLI or Prefect UI), and return what they said."""
    from prefect import pause_flow_run
    from prefect.runtime import flow_run

    log.info("[feedback] flow run paused: resume it with `alignflow-feedback resume %s` (add --proceed to train on "
             "the rankings given so far) or with Resume in the Prefect UI", flow_run.id)
    return pause_flow_run(wait_for_input=RankingsReady, timeout=max(1, int(remaining)),
                          poll_interval=max(1, poll_seconds))


def _snapshot(store: Any, keys: set[str], folder: Path) -> dict[str, Any]:
    """The stored rankings of `keys`, written once under their content digest (the next stage's key)."""
    rows = sorted((r for r in store.rows() if r["key"] in keys), key=lambda r: (r["key"], r["annotator"]))
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    digest = hashlib.sha256(text.encode()).hexdigest()
    path = folder / f"{digest[:16]}.jsonl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        partial.write_text(text)
        partial.replace(path)  # atomic: a crash never leaves half a snapshot under its digest
    return {"stage": "labels", "path": str(path), "manifest": {"digest": digest}, "n_rankings": len(rows)}


def resume(flow_run_id: str, proceed: bool) -> None:
    """Resume a flow run paused for rankings (PREFECT_API_URL must point at its server)."""
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    resume_flow_run(UUID(flow_run_id), run_input={"proceed": proceed})


def simulate(overrides: list[str], seed: int, limit: int | None) -> int:
    """Rank the open tasks of the configured project as `feedback.simulated_annotators`; returns how many."""
    from components.annotators import AnnotatorProfile
    from components.label_studio import play_annotators
    from flows.config import compose_config

    cfg = compose_config(["feedback=human_loop", *overrides])["feedback"]
    profiles = [AnnotatorProfile.from_config(p) for p in cfg["simulated_annotators"]]
    return play_annotators(label_studio_project(cfg["label_studio"]), profiles, seed, limit)


def main(argv: list[str] | None = None) -> None:
    """`alignflow-feedback resume <flow-run-id> [--proceed]` | `alignflow-feedback simulate [overrides…]`."""
    parser = argparse.ArgumentParser(prog="alignflow-feedback", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    res = sub.add_parser("resume", help="resume a flow run paused for rankings")
    res.add_argument("flow_run_id")
    res.add_argument("--proceed", action="store_true", help="train on the rankings given so far")
    sim = sub.add_parser("simulate", help="rank open tasks as the simulated annotator profiles")
    sim.add_argument("overrides", nargs="*", help="config overrides, e.g. feedback.label_studio.project=…")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--limit", type=int, default=None, help="rank at most this many tasks")
    args = parser.parse_args(argv)
    if args.command == "resume":
        resume(args.flow_run_id, args.proceed)
        print(f"resumed {args.flow_run_id}")
    else:
        print(f"ranked {simulate(args.overrides, args.seed, args.limit)} tasks as simulated annotators")
