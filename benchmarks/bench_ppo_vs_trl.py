"""Our PPO (components/ppo.py) against TRL 1.12's `PPOTrainer`, side by side, at equal settings.

Run by hand: `python benchmarks/bench_ppo_vs_trl.py [--threads 1] [--rounds 3]`. TRL 1.12 is the last release with
a PPO trainer, so it gets its own virtualenv (`benchmarks/.venv-trl112`, built on first use from the package index
with the same torch and transformers as ours). Both sides load the same tiny checkpoints from one folder: the
embedded default's GPT-2 (`conf/model/tiny.yaml`) as policy and reference, a sequence-classification model from
it as reward (and, for TRL, value) model; the same prompts, rollout batch, mini-batch, response length, epochs,
learning rate, KL coefficient and thread count. Runs alternate (ours, TRL, ours, …) in fresh processes, so load on
the machine hits both alike; each reports steady-state episodes/s (updates after the warm-up ones).
Prints each run, the CPU, the medians, our update split (generation / scoring forwards / optimisation / the rest),
the FLOPs of our optimisation phase and their rate against this CPU's float32 matrix-product speed (the bound that
phase puts on the ratio) and, last, `ratio <ours/TRL>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRL_VENV = HERE / ".venv-trl112"
TRL_VERSION = "1.12.0"


# --------------------------------------------------------------------------------------------- set-up (ours)
def trl_python() -> Path:
    """The TRL 1.12 virtualenv's python, built on first use with our torch and transformers versions."""
    python = TRL_VENV / "bin" / "python"
    if python.exists():
        return python
    import torch
    import transformers

    torch_version = torch.__version__.split("+")[0]
    print(f"building {TRL_VENV} (trl=={TRL_VERSION}, torch=={torch_version}, transformers=={transformers.__version__})")
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)  # the CPU build first, as in the Makefile
    subprocess.run([*pip, f"trl=={TRL_VERSION}", f"transformers=={transformers.__version__}"], check=True)
    return python


def build_fixture(folder: Path, n_prompts: int) -> None:
    """Policy and reward checkpoints of the embedded default's architecture, plus the prompts, in `folder`."""
    import yaml
    from transformers import AutoModelForSequenceClassification

    from components.modeling import build_causal_lm, train_tokenizer
    from components.review_task import build_embedded_splits, corpus

    init = yaml.safe_load((REPO / "conf/model/tiny.yaml").read_text())["init"]
    splits = build_embedded_splits(seed=0, n_sft=400, n_preference=50, n_eval_preference=10,
                                   n_prompts=n_prompts, n_eval_prompts=10, annotator_temperature=0.2)
    tokenizer = train_tokenizer(corpus(splits), init["vocab_size"])
    policy = build_causal_lm(init["arch"], tokenizer, seed=0)
    policy.save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(folder / "policy", num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(folder / "reward")
    tokenizer.save_pretrained(folder / "reward")
    prompts = [row["prompt"] for row in splits["prompts"]][:n_prompts]
    (folder / "prompts.json").write_text(json.dumps(prompts))


SETTINGS = {  # shared by both sides (TRL's names in trl_worker); one mini-batch per epoch, TRL's default
    "batch_size": 32, "mini_batch_size": 32, "ppo_epochs": 4, "max_new_tokens": 24, "learning_rate": 3e-5,
    "temperature": 1.0, "kl_coef": 0.05, "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2,
    "vf_coef": 0.1, "missing_eos_penalty": 1.0,
}


def ours_worker(fixture: Path, updates: int, warmup: int) -> dict:
    """Our PPO through the pipeline's own reward path (RewardScorer); per-update times from its metrics."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    import components.ppo as ppo
    from components.modeling import load_tokenizer
    from components.ppo import PPOSettings, train_ppo
    from components.scoring import RewardScorer

    prompts = json.loads((fixture / "prompts.json").read_text())
    settings = PPOSettings(
        **SETTINGS, total_updates=updates, adaptive_kl=False, target_kl=6.0, kl_horizon=10000, kl_estimator="k1",
        whiten_advantages=True, normalize_reward=False, max_grad_norm=1e9, rollout_batch_size=SETTINGS["batch_size"],
        seed=0, device="cpu", bf16=False,
    )  # fmt: skip
    scorer = RewardScorer(str(fixture / "reward"), "cpu", None)
    times: list[float] = []
    splits: list[dict] = []

    def on_log(update: int, metrics: dict) -> None:
        times.append(time.perf_counter())
        splits.append({k.split("/")[1]: v for k, v in metrics.items() if k.endswith("_seconds")})

    def reward_fn(p: list[str], c: list[str]) -> list[float]:
        return scorer.score(p, c, SETTINGS["batch_size"])

    token_reward_fn = scorer.token_scorer(load_tokenizer(str(fixture / "policy")), SETTINGS["batch_size"])
    flops: list[float] = []
    optimise = ppo._optimise

    def counted(*args, **kwargs) -> dict:  # the second (warm-up, untimed) update's optimisation, FLOPs counted
        if len(times) != 1 or warmup < 2:
            return optimise(*args, **kwargs)
        with FlopCounterMode(display=False) as counter:
            result = optimise(*args, **kwargs)
        flops.append(counter.get_total_flops())
        return result

    with tempfile.TemporaryDirectory() as out, mock.patch.object(ppo, "_optimise", counted):
        train_ppo(str(fixture / "policy"), prompts, reward_fn, settings, out, on_log, token_reward_fn)
    steady = splits[warmup:]
    split = {key: statistics.fmean(s[key] for s in steady) for key in steady[0]}
    return {"eps": SETTINGS["batch_size"] * (updates - warmup) / (times[-1] - times[warmup - 1]), "split": split,
            "optimisation_flops": flops[0] if flops else None, "gemm_flops_per_s": gemm_speed()}


def gemm_speed() -> float:
    """FLOP/s of float32 `torch.addmm` here, on the embedded model's MLP shapes (1024 tokens, 128 <-> 512): what
    the optimisation phase's matrix products (most of its time) can reach at best on this CPU and thread count."""
    import torch

    total, seconds = 0.0, 0.0
    for k, n in ((128, 512), (512, 128)):
        x, w, b = torch.randn(1024, k), torch.randn(k, n), torch.randn(n)
        for _ in range(5):
            torch.addmm(b, x, w)
        start = time.perf_counter()
        for _ in range(100):
            torch.addmm(b, x, w)
        seconds += time.perf_counter() - start
        total += 100 * 2 * 1024 * k * n
    return total / seconds


# ----------------------------------------------------------------------------------- TRL 1.12 (its own venv)
def trl_worker(fixture: Path, updates: int, warmup: int) -> dict:
    """TRL 1.12's PPOTrainer on the same checkpoints and settings; per-update times from a callback."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = SETTINGS
    tokenizer = AutoTokenizer.from_pretrained(fixture / "policy", padding_side="left")
    prompts = json.loads((fixture / "prompts.json").read_text())
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p).input_ids for p in prompts]})
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: D102 - HF callback signature
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0, save_strategy="no",
            per_device_train_batch_size=s["mini_batch_size"], gradient_accumulation_steps=1,
            num_mini_batches=s["batch_size"] // s["mini_batch_size"],
            local_rollout_forward_batch_size=s["batch_size"], total_episodes=s["batch_size"] * updates,
            num_ppo_epochs=s["ppo_epochs"], response_length=s["max_new_tokens"],
            learning_rate=s["learning_rate"], temperature=s["temperature"], kl_coef=s["kl_coef"], gamma=s["gamma"],
            lam=s["lam"], cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"],
            missing_eos_penalty=s["missing_eos_penalty"], stop_token="eos", num_sample_generations=0,
            logging_steps=1, disable_tqdm=True, gradient_checkpointing=False, dataloader_drop_last=True,
        )  # fmt: skip
        trainer = PPOTrainer(
            args=args, processing_class=tokenizer, train_dataset=dataset,
            model=AutoModelForCausalLM.from_pretrained(fixture / "policy"),
            ref_model=AutoModelForCausalLM.from_pretrained(fixture / "policy"),
            reward_model=AutoModelForSequenceClassification.from_pretrained(fixture / "reward", num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(fixture / "reward", num_labels=1),
            callbacks=[Clock()],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # it prints every update's metrics dict
        trainer.train()
    return {"eps": s["batch_size"] * (updates - warmup) / (times[-1] - times[warmup - 1])}


# ------------------------------------------------------------------------------------------------------ driver
def cpu_summary() -> str:
    """The CPU's model name and its widest matrix/vector units (from /proc/cpuinfo; Linux). The ratio depends on
    them: TRL runs about twice our model compute per update (a separate value model, forward and backward in
    every optimisation step), which wider units speed up more than the per-step overheads both sides share, so the
    same code gives another ratio on another CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu: unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = [name for name in ("amx_tile", "avx512f", "avx2") if name in flags]
    return f"cpu: {model}, {os.cpu_count()} cores, {units[0] if units else 'no avx2'}"


def run_worker(python: Path, side: str, fixture: Path, args: argparse.Namespace) -> dict:
    """One side in a fresh process with `args.threads` torch threads; returns its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [str(python), __file__, "--worker", side, "--fixture", str(fixture), "--out", out.name,
                   "--threads", str(args.threads), "--mini-batch", str(args.mini_batch),
                   "--updates", str(args.updates), "--warmup", str(args.warmup)]  # fmt: skip
        subprocess.run(command, check=True, env=env, cwd=REPO)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    """Build the fixture once, alternate the two sides for `--rounds` rounds, print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mini-batch", type=int, default=SETTINGS["mini_batch_size"],
                        help="completions per optimiser step (both sides)")
    parser.add_argument("--worker", choices=("ours", "trl"))
    parser.add_argument("--fixture", type=Path)
    parser.add_argument("--out")
    args = parser.parse_args()
    SETTINGS["mini_batch_size"] = args.mini_batch
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        worker = ours_worker if args.worker == "ours" else trl_worker
        Path(args.out).write_text(json.dumps(worker(args.fixture, args.updates, args.warmup)))
        return
    python = trl_python()
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as folder:
        build_fixture(Path(folder), SETTINGS["batch_size"] * 4)
        results: dict[str, list[dict]] = {"ours": [], "trl": []}
        for round_ in range(args.rounds):
            for side, exe in (("ours", Path(sys.executable)), ("trl", python)):
                results[side].append(run_worker(exe, side, Path(folder), args))
                print(f"round {round_ + 1} {side:4}: {results[side][-1]['eps']:6.1f} episodes/s", flush=True)
    ours = statistics.median(r["eps"] for r in results["ours"])
    trl = statistics.median(r["eps"] for r in results["trl"])
    split = {key: statistics.fmean(r["split"][key] for r in results["ours"]) for key in results["ours"][0]["split"]}
    update = split.pop("update_seconds")
    print(f"\nPPO, {SETTINGS['batch_size']} prompts x {SETTINGS['max_new_tokens']} tokens, {SETTINGS['ppo_epochs']} "
          f"epochs, mini-batch {SETTINGS['mini_batch_size']}, {args.threads} thread(s), {args.rounds} rounds")
    print(cpu_summary())
    print(f"episodes/s (median): ours {ours:.1f}  TRL {TRL_VERSION} {trl:.1f}")
    parts = {**split, "other_seconds": update - sum(split.values())}
    print("our update split: " + "  ".join(f"{k.removesuffix('_seconds')} {v / update:.0%}" for k, v in parts.items())
          + f"  (update {update * 1000:.0f} ms; model compute {1 - parts['other_seconds'] / update:.0%})")
    flops = [r["optimisation_flops"] for r in results["ours"] if r["optimisation_flops"]]
    if flops:  # the ceiling: TRL's whole update over our optimisation phase alone, model compute both
        speed = statistics.median(r["gemm_flops_per_s"] for r in results["ours"])
        optimising = split["optimisation_seconds"]
        print(f"our optimisation phase: {statistics.median(flops) / 1e9:.1f} GFLOP per update at "
              f"{statistics.median(flops) / optimising / 1e9:.1f} GFLOP/s; float32 addmm here: {speed / 1e9:.1f} "
              f"GFLOP/s. TRL's update takes {SETTINGS['batch_size'] / trl / optimising:.2f}x our optimisation phase: "
              f"the most this ratio can reach here while the optimisation does the same work")
    print(f"ratio {ours / trl:.2f}")


if __name__ == "__main__":
    main()
