"""Run a component entry point in this process, or under `accelerate launch` in N processes and ship its logs back.

A call is an entry point (`module:function`) and its keyword arguments; the function takes `on_log=` (the
`on_log(step, metrics)` seam of components/training.py) and returns a JSON-able dict. With `accelerate=none` it is
simply called here. Launched (`conf/accelerate/`, any option with a `config`):

1. the arguments are written as JSON (`encode`): a `datasets.Dataset` becomes a JSONL file, and a
   `{"$call": "module:function", "args": [...], "kwargs": {...}}` marker builds an object inside each process (the
   TRL args through `hydra.utils:instantiate`, PPO's settings through `PPOSettings.from_config`, its reward
   functions through `reward_fn` and `token_reward_fn` below);
2. `accelerate launch --config_file <the option's config> -m flows.launch call.json` starts N ranks (`main`);
3. rank 0 appends every `on_log` call as a JSON line and finally writes the result; a failing rank writes its
   error as one line;
4. this process replays the lines through its own `on_log` while the ranks run (live progress, MLflow curves as
   in-process), then returns the result, or raises `LaunchError` with the failing rank's one-line error.

Everything goes to `workdir` (the stage's scratch folder, outside its manifest). If this process stops, the ranks
stop too: the launch runs in its own process group (ended on any exit) and every rank exits once this process is
gone. Nothing here imports Prefect or MLflow: the ranks start fast.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.hooks import RewardFn, StepLogger, TokenRewardFn

if TYPE_CHECKING:
    from components.scoring import RewardScorer

Call = dict[str, Any]
Entry = Callable[..., Any] | str  # a function, or its `module:qualname` (what crosses to a launched process)
#: Stages that run launched under an accelerate option (RLOO and GRPO still train in one process).
LAUNCHED_STAGES = ("sft", "reward", "dpo", "ppo")
PARENT_ENV = "ALIGNFLOW_LAUNCH_PARENT"  # the pid every rank watches: when it is gone, the rank exits


class LaunchError(RuntimeError):
    """A launched entry point failed; the message is one line: which call, how many processes, the error."""


def launched(accelerate: dict[str, Any] | None) -> bool:
    """True when an `accelerate` config node asks for `accelerate launch` (any option but `none`)."""
    return bool(accelerate) and accelerate.get("config") is not None


def shards_parameters(accelerate: dict[str, Any] | None) -> bool:
    """True when `accelerate launch` splits each parameter over the processes (FSDP, DeepSpeed ZeRO-3), so that no
    process holds a whole weight (what weight averaging needs)."""
    launch = (accelerate or {}).get("config") or {}
    zero = (launch.get("deepspeed_config") or {}).get("zero_stage")
    return launch.get("distributed_type") == "FSDP" or (launch.get("distributed_type") == "DEEPSPEED" and zero == 3)


def per_process_batch(args: dict[str, Any], accelerate: dict[str, Any] | None) -> dict[str, Any]:
    """A TRL `args` node with `per_device_train_batch_size` split over the processes, so that per-device batch x
    processes x gradient accumulation stays the configured (one-process) batch; validation checks it divides."""
    if not launched(accelerate):
        return args
    n = int(accelerate["num_processes"])
    return {**args, "per_device_train_batch_size": args["per_device_train_batch_size"] // n}


def instantiated(node: dict[str, Any], **kwargs: Any) -> Call:
    """A `$call` marker that builds `node` (a Hydra `_target_` node) with `kwargs` where it is used."""
    return {"$call": "hydra.utils:instantiate", "args": [node], "kwargs": kwargs}


def call(entry: Entry, kwargs: dict[str, Any], on_log: StepLogger | None, accelerate: dict[str, Any] | None = None,
         workdir: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Call `entry(**kwargs, on_log=on_log)` here, or under `accelerate launch` when `accelerate` asks for it."""
    if not launched(accelerate):
        return resolve(entry)(**decode(kwargs), on_log=on_log)
    if workdir is None:
        raise ValueError("a launched call needs a workdir for its files")
    return launch(entry, kwargs, on_log, accelerate, Path(workdir), seed)


def entry_name(entry: Entry) -> str:
    """`module:qualname` of a function (a string passes through): how a launched process finds it."""
    return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"


def resolve(entry: Entry) -> Any:
    """`package.module:attr.attr` -> the object (a function passes through)."""
    if not isinstance(entry, str):
        return entry
    module, _, attrs = entry.partition(":")
    value: Any = importlib.import_module(module)
    for attr in filter(None, attrs.split(".")):
        value = getattr(value, attr)
    return value


def encode(value: Any, workdir: Path, name: str = "arg") -> Any:
    """`value` as JSON for another process: Datasets written to `workdir` as JSONL, Paths as strings."""
    from datasets import Dataset

    if isinstance(value, Dataset):
        path = workdir / f"{name}.jsonl"
        value.to_json(str(path), lines=True, force_ascii=False)
        return {"$dataset": str(path)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict) and "$call" in value:
        value = {**value, "$call": entry_name(value["$call"])}
    if isinstance(value, dict):
        return {str(k): encode(v, workdir, f"{name}.{k}" if name != "arg" else str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v, workdir, f"{name}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"`{name}` ({type(value).__name__}) cannot be sent to a launched process: pass JSON values, "
                    'a Dataset, or a {"$call": "module:factory", "kwargs": {...}} marker that builds it there')


def decode(value: Any) -> Any:
    """The inverse of `encode`, building `$call` markers; other objects (in-process calls) pass through."""
    if isinstance(value, dict):
        if "$dataset" in value:
            from datasets import Dataset

            return Dataset.from_json(value["$dataset"])
        if "$call" in value:
            return resolve(value["$call"])(*decode(value.get("args", [])), **decode(value.get("kwargs", {})))
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def reward_fn(path: str, device: str, batch_size: int) -> RewardFn:
    """A `$call` factory for PPO: the reward model at `path` as a `RewardFn` on texts, built where it runs."""
    scorer = reward_scorer(path, device)
    return lambda prompts, completions: scorer.score(prompts, completions, batch_size)


def token_reward_fn(path: str, device: str, policy_path: str, batch_size: int) -> TokenRewardFn | None:
    """A `$call` factory for PPO: the reward model at `path` scoring the policy's token ids, or None where its
    tokenizer differs from the one at `policy_path` (PPO then scores texts through `reward_fn`)."""
    from components.modeling import load_tokenizer

    return reward_scorer(path, device).token_scorer(load_tokenizer(policy_path), batch_size)


_SCORERS: weakref.WeakValueDictionary[tuple[str, str], RewardScorer] = weakref.WeakValueDictionary()


def reward_scorer(path: str, device: str) -> RewardScorer:
    """The `RewardScorer` at `path` on this process's device (`device` is the config's setting; a launched rank
    takes its own GPU), one per process: `reward_fn` and `token_reward_fn` share it while either lives."""
    from components.ppo import join_processes
    from components.scoring import RewardScorer

    scorer = _SCORERS.get((path, device))
    if scorer is None:
        scorer = RewardScorer(path, join_processes(device)[1], None)
        _SCORERS[(path, device)] = scorer
    return scorer


def threads_per_process(accelerate: dict[str, Any]) -> int:
    """This process's torch threads shared out over the ranks (at least one each): no oversubscription."""
    import torch

    return max(1, torch.get_num_threads() // int(accelerate["num_processes"]))


def write_call(entry: Entry, kwargs: dict[str, Any], accelerate: dict[str, Any], workdir: Path, seed: int) -> Path:
    """Write the call (`call.json`) and the accelerate config file (`accelerate.yaml`) into `workdir`."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("log.jsonl", "result.json", *(p.name for p in workdir.glob("error.rank*.txt"))):
        (workdir / stale).unlink(missing_ok=True)
    spec = {"entry": entry_name(entry), "kwargs": encode(kwargs, workdir), "seed": seed,
            "threads": threads_per_process(accelerate), "log": str(workdir / "log.jsonl"),
            "result": str(workdir / "result.json")}
    (workdir / "call.json").write_text(json.dumps(spec, indent=1))
    config = {**accelerate["config"], "num_processes": int(accelerate["num_processes"])}
    (workdir / "accelerate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir / "call.json"


def launch_command(workdir: Path, threads: int) -> list[str]:
    """`accelerate launch` of `flows.launch` on the call in `workdir`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(workdir / "accelerate.yaml"),
            "--num_cpu_threads_per_process", str(threads), "-m", "flows.launch", str(workdir / "call.json")]


def launch_env(accelerate: dict[str, Any], threads: int) -> dict[str, str]:
    """This environment plus the ranks' thread count, CPU mode where the config asks for it, and our pid."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
    if accelerate["config"].get("use_cpu"):
        env["ACCELERATE_USE_CPU"] = "true"  # transformers' TrainingArguments read it: CPU ranks over gloo
    return env


def launch(entry: Entry, kwargs: dict[str, Any], on_log: StepLogger | None, accelerate: dict[str, Any],
           workdir: Path, seed: int) -> dict[str, Any]:
    """Run the call under `accelerate launch`, replaying rank 0's log lines into `on_log` as they come."""
    write_call(entry, kwargs, accelerate, workdir, seed)
    threads = threads_per_process(accelerate)
    with open(workdir / "output.log", "w") as output:
        proc = subprocess.Popen(launch_command(workdir, threads), env=launch_env(accelerate, threads),
                                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            replay_while_running(proc, workdir / "log.jsonl", on_log)
        finally:
            stop(proc)
    result = workdir / "result.json"
    if proc.returncode != 0 or not result.is_file():
        raise LaunchError(f"{entry_name(entry)} under accelerate launch ({accelerate['num_processes']} processes) "
                          f"failed (exit {proc.returncode}): {failure(workdir)} (full output: "
                          f"{workdir / 'output.log'})")
    return json.loads(result.read_text())


def replay_while_running(proc: subprocess.Popen, log: Path, on_log: StepLogger | None,
                         poll_s: float = 0.5) -> None:
    """Feed complete log lines to `on_log` until `proc` exits, then the rest."""
    offset = 0
    while True:
        running = proc.poll() is None
        offset = replay(log, offset, on_log)
        if not running:
            return
        time.sleep(poll_s)


def replay(log: Path, offset: int, on_log: StepLogger | None) -> int:
    """Pass the complete lines of `log` after byte `offset` to `on_log(step, metrics)`; the new offset."""
    if not log.is_file():
        return offset
    with open(log, "rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
    for line in complete.decode().splitlines():
        record = json.loads(line)
        if on_log is not None:
            on_log(int(record["step"]), record["metrics"])
    return offset + len(complete)


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """End whatever still runs of the launch's process group (SIGTERM, then SIGKILL); a no-op once all exited."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group: accelerate launch, torchrun and every rank
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass


def failure(workdir: Path) -> str:
    """The first rank's one-line error, else the last line the launch printed."""
    errors = sorted(workdir.glob("error.rank*.txt"), key=lambda p: int(p.stem.removeprefix("error.rank")))
    if errors:
        return f"rank {errors[0].stem.removeprefix('error.rank')}: {errors[0].read_text().strip()}"
    output = workdir / "output.log"
    lines = [line.strip() for line in output.read_text(errors="replace").splitlines()] if output.is_file() else []
    return next((line for line in reversed(lines) if line), "no output")


class JsonLines:
    """`on_log` of rank 0: one JSON line per call, flushed at once so the parent sees progress live."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")


def watch_parent(pid: int, every_s: float = 1.0) -> None:
    """Exit this rank when process `pid` (the flow that launched it) is gone: no orphans after a kill -9."""
    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True, name="alignflow-parent-watch").start()


def main(argv: list[str] | None = None) -> None:
    """One rank: run the call in `argv[0]` (call.json); rank 0 writes the log lines and the result."""
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get(PARENT_ENV):
        watch_parent(int(os.environ[PARENT_ENV]))
    import torch
    from transformers import set_seed

    torch.set_num_threads(spec["threads"])
    set_seed(spec["seed"])
    log = Path(spec["log"])
    try:
        result = resolve(spec["entry"])(**decode(spec["kwargs"]), on_log=JsonLines(log) if rank == 0 else None)
    except BaseException as err:
        (log.parent / f"error.rank{rank}.txt").write_text(f"{type(err).__name__}: {' '.join(str(err).split())}\n")
        raise
    if rank == 0:
        tmp = Path(spec["result"] + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(spec["result"])
    leave_process_group()


def leave_process_group() -> None:
    """Wait for every rank, then close the process group: a rank that exits with it open can abort in its
    communication threads' teardown ("terminate called without an active exception") while the others still
    talk, failing a run whose result is already written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
