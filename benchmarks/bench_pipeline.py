"""Benchmark the pipeline on the embedded default: per-stage wall time, orchestration overhead, cached rerun, memory.

Run by hand (`make bench`, or `python benchmarks/bench_pipeline.py [hydra overrides…]`). First in one process,
side by side, in a fresh store: a first run, then the identical rerun that the cache serves (its outputs checked by
size, then once more re-hashed: `cache.verify=hashes`), with each stage's peak resident memory. Then as a user
sees it, whole `alignflow` processes in another fresh store: a first run, the identical rerun with Prefect's
temporary server, and the same rerun against a running `prefect server` (what alignflow uses when it finds one).
It also times a fresh interpreter importing Prefect and MLflow's SQL store: the floor under any such rerun.
Prints ratios rather than asserting speeds; torch's thread count is fixed and reported.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def main(overrides: list[str]) -> None:
    """Run the pipeline twice in a fresh store and print the measurements."""
    root = tempfile.mkdtemp(prefix="alignflow-bench-")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ["ALIGNFLOW_ROOT"] = root
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from flows.lifecycle import tie_children_to_process
    from flows.pipeline import alignflow

    tie_children_to_process()  # a benchmark stopped by SIGTERM (or killed) takes Prefect's temporary server with it
    t0 = time.monotonic()
    first = alignflow(overrides=overrides)
    first_wall = time.monotonic() - t0
    t1 = time.monotonic()
    second = alignflow(overrides=overrides)
    second_wall = time.monotonic() - t1
    hashed = alignflow(overrides=[*overrides, "cache.verify=hashes"])  # reuse with every output re-hashed
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    compute = sum(s["seconds"] for s in first["stages"])
    print(f"\nalignflow benchmark  overrides={overrides}  torch threads={torch.get_num_threads()}  store={root}")
    print(f"{'stage':8} {'wall s':>8} {'compute s':>10} {'rerun s':>8} {'peak RSS GiB':>13}")
    for a, b in zip(first["stages"], second["stages"], strict=True):
        rss = a["metrics"].get(f"{a['stage']}/peak_rss_gib", float("nan"))
        print(f"{a['stage']:8} {a['wall']:8.1f} {a['seconds']:10.1f} {b['wall']:8.2f} {rss:13.2f}")
    print(f"first run: flow {first['seconds']:.1f} s, process call {first_wall:.1f} s (incl. Prefect start-up)")
    print(f"pipeline flow total / sum of stage compute = {first['seconds'] / compute:.3f}"
          f"  (orchestration overhead {first['seconds'] - compute:.1f} s)")
    print(f"cached rerun / first run = {second['seconds'] / first['seconds']:.4f} (flow), "
          f"{second_wall / first_wall:.4f} (process call); stages reused: "
          f"{sum(s['cached'] for s in second['stages'])}/{len(second['stages'])}")
    print(f"cached rerun with cache.verify=hashes: flow {hashed['seconds']:.2f} s vs {second['seconds']:.2f} s "
          f"with sizes only; stages reused: {sum(s['cached'] for s in hashed['stages'])}/{len(hashed['stages'])}")
    print(f"peak resident memory: {peak_gib:.2f} GiB")
    metrics = {k: v for s in first["stages"] for k, v in s["metrics"].items()}
    for name in ("reward/eval_accuracy", "reward/bayes_ceiling", "eval/win_rate_vs_sft", "eval/gold_reward_mean",
                 "eval/gold_reward_mean_sft", "eval/kl_to_sft"):
        print(f"{name:28} {metrics.get(name, float('nan')):.4f}")


def run_cli(overrides: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one whole `alignflow` process (imports, Prefect, the flow, exit)."""
    start = time.monotonic()
    subprocess.run([str(BIN / "alignflow"), *overrides], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def whole_process(overrides: list[str]) -> None:
    """First run, identical rerun (temporary Prefect server), identical rerun with a running Prefect server."""
    root = Path(tempfile.mkdtemp(prefix="alignflow-bench-cli-"))
    threads = os.environ.get("BENCH_THREADS", "2")
    env = {**os.environ, "ALIGNFLOW_ROOT": str(root), "ALIGNFLOW_PREFECT_SERVER": "none", "OMP_NUM_THREADS": threads}
    env.pop("PREFECT_API_URL", None)
    args = [*overrides, f"num_threads={threads}"]
    first = run_cli(args, env)
    rerun = run_cli(args, env)
    home = root / "prefect-server"
    home.mkdir()
    port = 4300 + os.getpid() % 500
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env={**env, "PREFECT_HOME": str(home)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        run_cli(args, {**env, "PREFECT_API_URL": url})  # the server's first flow run registers the flow
        served = run_cli(args, {**env, "PREFECT_API_URL": url})
    finally:
        os.killpg(server.pid, 15)
        server.wait()
    floor = min(import_seconds(env) for _ in range(2))
    print(f"\nwhole process: first run {first:.1f} s; identical rerun {rerun:.1f} s with a temporary Prefect server "
          f"(ratio {rerun / first:.3f}), {served:.1f} s with a running one (ratio {served / first:.3f})")
    print(f"of which a fresh Python importing Prefect and MLflow's SQL store, which every tracked run needs: "
          f"{floor:.1f} s (ratio {floor / first:.3f})")


def import_seconds(env: dict[str, str]) -> float:
    """Wall seconds of a fresh interpreter that only imports what a tracked run cannot do without: Prefect, MLflow
    and its SQL tracking store (the local store's backend); the floor under any identical rerun."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import prefect, mlflow, mlflow.store.tracking.sqlalchemy_store"],
                   env=env, check=True)
    return time.monotonic() - start


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if a != "--no-process"]
    main(argv)
    if "--no-process" not in sys.argv:
        whole_process(argv)
