"""Sequential vs dispatched sweep wall time: the same 4-job sweep run one job after another and on two workers.

Run by hand (`make bench` runs it, or `python benchmarks/bench_sweep.py`; ~7 min on 2 cores). It starts the
cluster the `cluster` test uses (tests/stack.py: PostgreSQL, an MLflow server on it, a Prefect server, a process
work pool and two workers), then runs `rl.kl_coef=0.05,0.1,0.2,0.4` on the tiny setup twice, each on a fresh
root (nothing cached): dispatched (`hydra/launcher=prefect`, cores split between the jobs running at once) and
sequential (Hydra's basic launcher, 1 thread: on tiny models 2 threads are no faster, so it is the stronger
baseline). Prints both wall times and, last, `ratio <dispatched/sequential>`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import stack  # noqa: E402  (the repository root is on the path only now)


def main() -> None:
    """Start the cluster, run both sweeps, print the wall times and their ratio."""
    work = Path(tempfile.mkdtemp(prefix="alignflow-bench-sweep-"))
    walls = {}
    with stack.postgres() as uri, stack.sweep_cluster(uri, work) as cluster:
        for name, args in (("dispatched", stack.DISPATCHED), ("sequential", stack.SEQUENTIAL)):
            (work / name).mkdir()
            seconds, output, status = stack.run_sweep(cluster, work / name, *args, threads=1,
                                                     updates=stack.BENCH_UPDATES)
            if status:
                raise SystemExit(f"{name} sweep failed (exit {status}); its output: {work / name / 'sweep.log'}")
            walls[name] = seconds
            print(f"{name:10} sweep of 4 jobs: {seconds:6.1f} s", flush=True)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load}; logs under {work}")
    print(f"ratio {walls['dispatched'] / walls['sequential']:.3f}")


if __name__ == "__main__":
    main()
