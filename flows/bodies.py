"""What each stage task does: read upstream artifacts, call one components/ function, log to its MLflow run.

Each body takes (spec, stage_dir, run_id) and returns its metrics; its name is its Prefect task's name
(`verb_noun`), and its row in `flows.stages.STAGES` says which config slice and component modules make its key.
`flows.stages.execute` handles the cache marker and the child run around it. Bodies are the only place that knows
how stage directories are laid out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd  # already imported by mlflow
from hydra.utils import instantiate
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

from components.stats import STDERR
from flows.progress import StageLogger

if TYPE_CHECKING:  # `datasets` and components.modeling (torch) are imported by the bodies that run
    from datasets import Dataset

SPLITS = ("sft", "preference", "preference_eval", "prompts", "eval_prompts")


def load_split(result: dict[str, Any], split: str, log: bool = True) -> Dataset:
    """One split written by an upstream stage (prepare_data, label_preferences); logged as this run's input."""
    from datasets import Dataset

    folder = Path(result["path"])
    ds = Dataset.from_json(str(folder / f"{split}.jsonl"))
    if log:
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        _log_split(ds, meta.get("name", result["stage"]), folder / f"{split}.jsonl", split)
    return ds


def _log_split(ds: Dataset, name: str, path: Path, split: str, origin: dict[str, Any] | None = None) -> None:
    context = "eval" if "eval" in split else "training"
    dataset = mlflow.data.from_huggingface(ds, source=dataset_source(path, origin), name=f"{name}/{split}")
    mlflow.log_input(dataset, context=context)


#: For `data=files`: the config nodes a split can come from, the first one set wins (held-out splits are carved
#: out of the training node when they have none of their own; prompts come from the pairs when not given).
ORIGINS = {"sft": ("sft",), "preference": ("preference",), "preference_eval": ("preference_eval", "preference"),
           "prompts": ("prompts", "preference"), "eval_prompts": ("prompts", "preference_eval", "preference")}


def dataset_source(path: Path, origin: dict[str, Any] | None = None) -> DatasetSource:
    """Where a split really comes from: the user's local file or the hub dataset named by its `data.*` node
    (`origin`), else the JSONL file at `path`; only a hub id gets a Hugging Face source (a huggingface.co link)."""
    from components.data import looks_local

    where = str(origin["path"]) if origin else str(path)
    if origin is None or Path(where).expanduser().exists() or looks_local(where):
        uri = str(Path(where).expanduser().resolve())
        return get_dataset_source_from_json(json.dumps({"uri": uri}), source_type="local")
    return HuggingFaceDatasetSource(path=where, config_name=origin.get("name"), split=origin.get("split"))


def prepare_data(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """Build (embedded) or load (files/hub) every split, validate, write JSONL, log as MLflow datasets."""
    from datasets import Dataset

    from components.review_task import build_embedded_splits, embedded_stats

    cfg = spec["config"]
    if cfg["source"] == "embedded":
        splits = {k: Dataset.from_list(v) for k, v in build_embedded_splits(**cfg["embedded"]).items()}
        profiles = cfg["embedded"].get("annotators") or []  # annotator profiles labelling the pairs, if any
        stats = embedded_stats({k: v.to_list() for k, v in splits.items()},
                               cfg["embedded"]["annotator_temperature"], profiles)
        if profiles:  # evaluation judges the policy by each profile's utility
            (stage_dir / "profiles.json").write_text(json.dumps(profiles, indent=2))
    else:
        from components.data import load_file_splits

        splits, stats = load_file_splits(cfg), {}
    metrics = {f"data/{k}": float(v) for k, v in stats.items()}
    if "preference_eval_bayes_ceiling" in stats:  # the ceiling of held-out reward-model accuracy
        metrics["data/bayes_ceiling"] = float(stats["preference_eval_bayes_ceiling"])
    for split in SPLITS:
        path = stage_dir / f"{split}.jsonl"
        splits[split].to_json(str(path), lines=True, force_ascii=False)
        origin = next((cfg[n] for n in ORIGINS[split] if cfg.get(n)), None) if cfg["source"] == "files" else None
        _log_split(splits[split], cfg["name"], path, split, origin)
        metrics[f"data/n_{split}"] = float(len(splits[split]))
    (stage_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    (stage_dir / "meta.json").write_text(json.dumps({"name": cfg["name"]}))
    return metrics


def _base_model(spec: dict[str, Any], stage_dir: Path) -> str:
    from components.modeling import build_base_checkpoint
    from components.review_task import HELD_OUT_SPLITS, corpus

    model = spec["config"]["model"]
    if model["name_or_path"]:
        return model["name_or_path"]
    data = spec["upstream"]["data"]
    texts = corpus({s: load_split(data, s, log=False).to_list() for s in SPLITS if s not in HELD_OUT_SPLITS})
    return build_base_checkpoint(texts, model["init"]["arch"], model["init"]["vocab_size"],
                                 spec["config"]["seed"], stage_dir / "base")


def train_sft(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """Build the embedded base model if asked, then fine-tune it on the demonstrations with TRL."""
    cfg = spec["config"]["sft"]
    train = load_split(spec["upstream"].get("revise") or spec["upstream"]["data"], "sft")
    if cfg["max_train_samples"]:
        train = train.select(range(min(cfg["max_train_samples"], len(train))))
    logger = StageLogger("sft", run_id, None, "sft/loss")
    base = _sft_model(spec) if "sft" in spec["upstream"] else _base_model(spec, stage_dir)
    from components.sft import train_sft as sft

    metrics = _run_trainer(spec, stage_dir, sft, cfg["args"], logger, model_path=base,
                           train=train)
    _log_model_dir(spec, stage_dir / "model")
    return metrics


def train_reward_model(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """Train the reward model from the SFT checkpoint (or a given one); measure held-out pairwise accuracy."""
    from components.modeling import resolve_device
    from components.reward import RewardConditioning, pairwise_accuracy
    from components.reward import train_reward_model as train_rm
    from components.scoring import RewardScorer

    cfg = spec["config"]["reward"]
    data = spec["upstream"]["data"]
    init = cfg["model_name_or_path"] or _sft_model(spec)
    pairs = load_split(_feedback(spec), "preference")
    conditioning = _conditioning(RewardConditioning.from_config(cfg), pairs)
    pairs = pairs.select_columns(["prompt", "chosen", "rejected", *(["annotator"] if conditioning else [])])
    logger = StageLogger("reward", run_id, None, "reward/loss")
    metrics = _run_trainer(spec, stage_dir, train_rm, cfg["args"], logger,
                           init_path=init, train=pairs, ema_decay=_ema_decay(spec),
                           length_buckets=cfg.get("length_buckets", 1), **conditioning)
    scorer = RewardScorer(str(stage_dir / "model"), resolve_device(spec["config"]["device"]), None)
    metrics |= pairwise_accuracy(scorer, load_split(data, "preference_eval"), cfg["score_batch_size"])
    ceiling = data["metrics"].get("data/bayes_ceiling")
    if ceiling is not None:
        metrics["reward/bayes_ceiling"] = ceiling
    _log_model_dir(spec, stage_dir / "model")
    return metrics


def _ema_decay(spec: dict[str, Any]) -> float | None:
    """`reward.ema_decay`, unless `accelerate` shards the parameters (no process holds a whole weight to average):
    then the reward model keeps its last step's weights, and the log says so."""
    from flows.launch import shards_parameters

    decay = spec["config"]["reward"].get("ema_decay")
    accelerate = spec["config"].get("accelerate")
    if decay and shards_parameters(accelerate):
        logging.getLogger("alignflow").warning(
            "reward.ema_decay=%s is not applied under accelerate=%s, which shards the parameters: the reward model "
            "keeps its last step's weights", decay, accelerate["name"])
        return None
    return decay


def _conditioning(settings: Any, pairs: Dataset) -> dict[str, Any]:
    """`heads` (the pairs' annotators, sorted) and their `mix` weights for a per-annotator reward model; nothing for
    a pooled one. Errors name `reward.conditioning` / `reward.mix` and the fix."""
    if settings.conditioning == "pooled":
        return {}
    if "annotator" not in pairs.column_names:
        raise ValueError("config field `reward.conditioning` = 'per_annotator' needs pairs with an `annotator` column: "
                         "use data=embedded_diverse, ranked data with annotators, or reward.conditioning=pooled")
    heads = sorted({str(a) for a in pairs["annotator"]})
    try:
        return {"heads": heads, "mix": settings.weights(heads)}
    except ValueError as err:  # "mix = … is invalid: …"
        field, _, rest = str(err).partition(" ")
        raise ValueError(f"config field `reward.{field}` {rest}") from err


def load_prompts(result: dict[str, Any], split: str, model_path: str, limit: int | None = None) -> list[str]:
    """Prompts of a split as text for `model_path`'s tokenizer (conversations rendered by its chat template)."""
    from components.generation import render_prompts
    from components.modeling import load_tokenizer

    prompts = list(load_split(result, split)["prompt"])[: limit or None]
    return render_prompts(prompts, load_tokenizer(model_path))


def _feedback(spec: dict[str, Any]) -> dict[str, Any]:
    """Where the training pairs come from: the AI-labelled set when the pipeline has one, else the data."""
    return spec["upstream"].get("label") or spec["upstream"]["data"]


def train_ppo(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """PPO from the SFT checkpoint against the trained reward model: in this process, or under `accelerate launch`
    when the stage's config slice has an `accelerate` node (each process rolls out its slice of every global batch;
    rank 0's logs come back through the logger; see components.ppo and flows.launch)."""
    from components.ppo import train_ppo as ppo
    from flows.launch import call

    prompts = load_prompts(spec["upstream"]["data"], "prompts", _sft_model(spec))
    logger = StageLogger("ppo", run_id, spec["config"]["rl"]["total_updates"], "ppo/mean_reward", zero_based=True)
    metrics = call(ppo, ppo_arguments(spec, stage_dir, prompts), logger,
                   spec["config"].get("accelerate"), stage_dir / "trainer" / "launch", spec["seed"])
    _log_model_dir(spec, stage_dir / "model")
    return {k: float(v) for k, v in metrics.items()}


def ppo_arguments(spec: dict[str, Any], stage_dir: Path, prompts: list[str]) -> dict[str, Any]:
    """`components.ppo:train_ppo`'s arguments as JSON and `$call` markers, built where PPO runs (here or in each
    launched process): its settings from the `rl` node, and the reward model on that process's device, scoring
    texts and, when the policy shares its tokenizer, the sampled token ids (one scorer for both)."""
    from components.ppo import PPOSettings
    from flows.launch import reward_fn, token_reward_fn

    rl, sft = spec["config"]["rl"], _sft_model(spec)
    scorer = {"path": str(Path(spec["upstream"]["reward"]["path"]) / "model"), "device": spec["config"]["device"],
              "batch_size": rl["reward_batch_size"]}
    return {"policy_path": sft, "prompts": prompts,
            "reward_fn": {"$call": reward_fn, "kwargs": scorer},
            "settings": {"$call": PPOSettings.from_config, "args": [rl]},
            "output_dir": str(stage_dir / "model"),
            "token_reward_fn": {"$call": token_reward_fn, "kwargs": {**scorer, "policy_path": sft}}}


def evaluate_policy(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """Compare the policy with SFT on held-out prompts; log metrics and a table of sample texts."""
    from components.evaluate import compare_policies
    from components.generation import SamplingSettings
    from components.modeling import resolve_device
    from components.scoring import RewardScorer

    cfg, up = spec["config"]["eval"], spec["upstream"]
    device = resolve_device(spec["config"]["device"])
    prompts = load_prompts(up["data"], "eval_prompts", _sft_model(spec), cfg["max_prompts"])
    scorer = RewardScorer(str(Path(up["reward"]["path"]) / "model"), device, None) if "reward" in up else None
    settings = SamplingSettings.from_config(cfg)
    profiles = _profiles(up["data"])
    metrics, rows = compare_policies(str(Path(up["policy"]["path"]) / "model"),
                                     str(Path(up["sft"]["path"]) / "model"), prompts, settings, device,
                                     scorer, _gold_fn(spec["config"]["gold"]), profiles)
    (stage_dir / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mlflow.log_table(pd.DataFrame(rows[: cfg["n_table_rows"]]), "samples.json")
    _tag_worst_served(metrics, run_id)
    return metrics


def _profiles(data: dict[str, Any]) -> list[Any]:
    """The annotator profiles that labelled the data (its `profiles.json`), or none."""
    from components.annotators import profiles_from_config

    path = Path(data["path"]) / "profiles.json"
    return profiles_from_config(json.loads(path.read_text())) if path.is_file() else []


def _tag_worst_served(metrics: dict[str, float], run_id: str) -> None:
    """Name the profile the policy serves worst: a tag on this run and the pipeline run, and a log line."""
    import logging

    from components.annotators import PROFILE_WIN_RATE, worst_served

    worst = worst_served(metrics)
    if worst is None:
        return
    tag = "alignflow.worst_served_profile"
    mlflow.set_tag(tag, worst)
    parent = mlflow.get_run(run_id).data.tags.get("mlflow.parentRunId")
    if parent:
        mlflow.MlflowClient().set_tag(parent, tag, worst)
    rates = "  ".join(f"{k.removeprefix(PROFILE_WIN_RATE)}={v:.3f}" for k, v in metrics.items()
                      if k.startswith(PROFILE_WIN_RATE))
    logging.getLogger("alignflow").info("[eval] serves %s worst; gold win rate vs SFT per profile: %s "
                                        "(disagreement %.3f)", worst, rates, metrics["eval/profile_disagreement"])


def _gold_fn(gold: str | None):
    if gold is None:
        return None
    if gold != "embedded":
        raise ValueError(f"config field `data.gold` = {gold!r} is unknown: use `embedded` or null")
    from components.review_task import gold_rewards

    return lambda prompts, completions: gold_rewards(completions)


def _log_model_dir(spec: dict[str, Any], model_dir: Path) -> None:
    """The checkpoint as an MLflow LoggedModel of this stage's run (flows.models: uploaded when
    `tracking.log_models`, else a record pointing at the stage directory)."""
    from flows.models import log_checkpoint

    log_checkpoint(spec["stage"], spec["key"], model_dir, spec["options"]["log_models"])


def _sft_model(spec: dict[str, Any]) -> str:
    return str(Path(spec["upstream"]["sft"]["path"]) / "model")


def train_dpo(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """DPO from the SFT checkpoint (also its frozen reference) on the human- or AI-labelled pairs."""
    from components.dpo import train_dpo as dpo

    cfg = spec["config"]["dpo"]
    pairs = load_split(_feedback(spec), "preference").select_columns(["prompt", "chosen", "rejected"])
    if cfg["max_train_samples"]:
        pairs = pairs.select(range(min(cfg["max_train_samples"], len(pairs))))
    logger = StageLogger("dpo", run_id, None, "dpo/loss")
    metrics = _run_trainer(spec, stage_dir, dpo, cfg["args"], logger,
                           sft_path=_sft_model(spec), train=pairs)
    _log_model_dir(spec, stage_dir / "model")
    return metrics


def _run_trainer(spec: dict[str, Any], stage_dir: Path, entry: Callable[..., dict], args: dict[str, Any],
                 logger: StageLogger, **inputs: Any) -> dict[str, float]:
    """Call a TRL stage's component function with its `args` node, `output_dir` and LoRA settings:
    in this process, or under `accelerate launch` when the stage's config slice has an `accelerate` node (each
    process then gets its share of the batch; rank 0's logs come back through `logger`; see flows.launch)."""
    from flows.launch import call, instantiated, per_process_batch

    accelerate, peft = spec["config"].get("accelerate"), spec["config"].get("peft")
    lora = {k: v for k, v in peft.items() if k not in ("method", "stages")} if peft else None
    trainer_dir = stage_dir / "trainer"  # scratch, outside the stage's manifest
    kwargs = {**inputs, "args": instantiated(per_process_batch(args, accelerate), output_dir=str(trainer_dir)),
              "output_dir": stage_dir / "model", "lora": lora}
    return call(entry, kwargs, logger, accelerate, trainer_dir / "launch", spec["seed"])


def train_rloo(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """RLOO (TRL's RLOOTrainer) from the SFT checkpoint against the trained reward model."""
    return _train_trl_rl(spec, stage_dir, run_id, "rloo")


def train_grpo(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """GRPO (TRL's GRPOTrainer) from the SFT checkpoint against the trained reward model."""
    return _train_trl_rl(spec, stage_dir, run_id, "grpo")


def _train_trl_rl(spec: dict[str, Any], stage_dir: Path, run_id: str, algo: str) -> dict[str, float]:
    from datasets import Dataset

    from components import trl_rl
    from components.modeling import resolve_device
    from components.scoring import RewardScorer

    rl = spec["config"]["rl"]
    device = resolve_device(spec["config"]["device"])
    scorer = RewardScorer(str(Path(spec["upstream"]["reward"]["path"]) / "model"), device, None)
    prompts = Dataset.from_dict({"prompt": load_prompts(spec["upstream"]["data"], "prompts", _sft_model(spec))})
    args = instantiate(rl["args"], output_dir=str(stage_dir / "trainer"))

    def reward_fn(p: list[str], c: list[str]) -> list[float]:
        return scorer.score(p, c, rl["reward_batch_size"])

    train = {"rloo": trl_rl.train_rloo, "grpo": trl_rl.train_grpo}[algo]
    logger = StageLogger(algo, run_id, None, f"{algo}/reward")
    metrics = train(_sft_model(spec), prompts, reward_fn, args, rl.get("missing_eos_penalty"), stage_dir / "model",
                    logger)
    _log_model_dir(spec, stage_dir / "model")
    return metrics


def revise_demonstrations(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """CAI supervised phase: SFT answers critiqued and revised principle by principle become new demos."""
    from datasets import Dataset

    from components.generation import SamplingSettings, sample
    from components.modeling import load_causal_lm, load_tokenizer, resolve_device
    from components.revision import critique_and_revise

    cfg = spec["config"]["revision"]
    device = resolve_device(spec["config"]["device"])
    prompts = load_prompts(spec["upstream"]["data"], "prompts", _sft_model(spec), cfg["n_prompts"])
    s = SamplingSettings.from_config(cfg)
    sft = load_causal_lm(_sft_model(spec)).to(device).eval()
    answers = sample(sft, load_tokenizer(_sft_model(spec)), prompts, s).texts
    reviser = cfg["model_name_or_path"] or _sft_model(spec)
    rows = critique_and_revise(reviser, prompts, answers, cfg["principles"], s, device)
    Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["completion"]]
                      ).to_json(str(stage_dir / "sft.jsonl"), lines=True)
    (stage_dir / "revisions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (stage_dir / "meta.json").write_text(json.dumps({"name": "cai-revisions"}))
    mlflow.log_table(pd.DataFrame([{k: r[k] for k in ("prompt", "original", "completion")} for r in rows[:32]]),
                     "revisions.json")
    changed = sum(r["completion"].strip() != r["original"].strip() for r in rows)
    return {"revise/n_revised": float(len(rows)), "revise/changed_rate": changed / max(len(rows), 1)}


def label_preferences(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """RLAIF feedback: pairs sampled from SFT, labelled by the AI judge; verdicts cached across attempts."""
    from datasets import Dataset

    from components.generation import SamplingSettings
    from components.judges import build_judge
    from components.labeling import label_pairs, label_stats, sample_pairs, to_preferences
    from components.modeling import resolve_device

    cfg, label = spec["config"]["judge"], spec["config"]["label"]
    device = resolve_device(spec["config"]["device"])
    s = label["sampling"]
    prompts = load_prompts(spec["upstream"]["data"], "prompts", _sft_model(spec), s["n_pairs"])
    pairs = sample_pairs(_sft_model(spec), prompts, SamplingSettings.from_config(s), device)
    pairs_digest = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()[:16]
    judge = build_judge(cfg["kind"], cfg["settings"], cfg["principles"])
    mlflow.set_tags({"alignflow.judge": judge.fingerprint(), "alignflow.pairs_fingerprint": pairs_digest})
    # Verdicts live outside the stage directory, keyed by judge and pair: a failed attempt keeps what it paid for.
    cache = Path(spec["dir"]).parents[1] / "judge_cache" / f"{judge.fingerprint()}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    progress = StageLogger("label", run_id, None, "label/pairs_asked")
    verdicts = label_pairs(judge, pairs, cache, label["batch_size"], progress)
    prefs = to_preferences(pairs, verdicts)
    Dataset.from_list(prefs).to_json(str(stage_dir / "preference.jsonl"), lines=True)
    (stage_dir / "meta.json").write_text(json.dumps({"name": f"ai-{cfg['kind']}"}))
    load_split({"path": str(stage_dir), "stage": "label"}, "preference")  # logs the labelled set as an input
    table = [{"prompt": p["prompt"], "a": p["response_a"], "b": p["response_b"], "preference": v.preference}
             for p, v in zip(pairs[:32], verdicts[:32], strict=True)]
    mlflow.log_table(pd.DataFrame(table), "verdicts.json")
    gold = _gold_fn(spec["config"]["gold"])
    return label_stats(pairs, verdicts, gold)


def register_policy(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """Register the evaluated policy as a version of `registry.model_name` (once per policy, found again by its
    content digest) and move the `registry.alias` only through the quality gate; the verdict and its reason are
    tagged on the version, this run and the pipeline run."""
    from flows.models import find_or_register, gate, record_verdict, stage_model

    registry, policy, evaluated = spec["config"]["registry"], spec["upstream"]["policy"], spec["upstream"]["eval"]
    if not registry["enabled"]:
        return {"register/enabled": 0.0}
    run = mlflow.get_run(run_id)
    pipeline_run = run.data.tags["mlflow.parentRunId"]
    model_id = stage_model(policy, run.info.experiment_id, spec["options"]["log_models"])
    value = evaluated["metrics"].get(registry["metric"])
    stderr = evaluated["metrics"].get(registry["metric"] + STDERR)  # logged by eval for its win rates
    tags = {"alignflow.stage": policy["stage"], "alignflow.key": policy["key"],
            "alignflow.checkpoint": str(Path(policy["path"]) / "model"), "alignflow.pipeline_run": pipeline_run,
            "alignflow.eval_run": evaluated["mlflow_run_id"], "alignflow.metric": registry["metric"]}
    if value is not None:
        tags["alignflow.metric_value"] = repr(float(value))
    if stderr is not None:
        tags[f"alignflow.metric{STDERR}_value"] = repr(float(stderr))
    version = find_or_register(registry["model_name"], model_id, policy["manifest"]["digest"], tags)
    decision, reason = gate(registry, version, value, stderr)
    record_verdict(registry["model_name"], version.version, decision.outcome, reason, [run_id, pipeline_run])
    (stage_dir / "registration.json").write_text(json.dumps(
        {"model_name": registry["model_name"], "version": int(version.version), "model_id": model_id,
         "champion": decision.outcome, "reason": reason}, indent=2))
    return {"register/version": float(version.version), "register/promoted": float(decision.promote)}


def label_store_path(spec: dict[str, Any]) -> Path:
    """The rankings store shared by every feedback round and run: beside the stage folders, like the judge cache."""
    return Path(spec["dir"]).parents[1] / "feedback_labels" / "rankings.jsonl"


def request_feedback(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """Human feedback, part 1: sample K responses per candidate prompt, choose this round's items within the label
    budget by the configured strategy, and send them to Label Studio for ranking (also as tasks.json, Label
    Studio's import format, for Argilla or in-house tools). Items someone already ranked are never sent again."""
    from components.feedback import FeedbackSettings, LabelStore, label_studio_task, open_items, sample_candidates
    from components.generation import SamplingSettings
    from components.modeling import resolve_device
    from components.selection import select_prompts

    cfg = spec["config"]["feedback"]
    settings = FeedbackSettings.from_config(cfg)
    device = resolve_device(spec["config"]["device"])
    model = cfg["policy_path"] if cfg["source"] == "policy" else _sft_model(spec)
    prompts = load_prompts(spec["upstream"]["data"], "prompts", _sft_model(spec), settings.n_candidates)
    items = sample_candidates(model, prompts, settings.n_responses, SamplingSettings.from_config(cfg["sampling"]),
                              device)
    candidates = open_items(items, LabelStore(label_store_path(spec)).labelled_keys())
    scores = _candidate_scores(cfg, candidates, device)
    chosen = [candidates[i] for i in select_prompts(settings.strategy, scores, settings.budget, spec["seed"])]
    (stage_dir / "tasks.json").write_text(json.dumps([label_studio_task(item) for item in chosen], indent=1))
    mlflow.log_artifact(str(stage_dir / "tasks.json"))  # the round as a file, for Argilla or in-house tools
    studio = cfg["label_studio"]
    project = label_studio_project(studio)
    imported = project.import_items(chosen)
    request = {"url": studio["url"], "project": studio["project"], "project_id": project.id,
               "sent": [item["key"] for item in chosen], "candidates": [item["key"] for item in items]}
    (stage_dir / "request.json").write_text(json.dumps(request, indent=1))
    mlflow.set_tags({"alignflow.label_studio_project": f"{studio['url'].rstrip('/')}/projects/{project.id}"})
    return {"feedback_request/n_candidates": float(len(items)),
            "feedback_request/n_already_ranked": float(len(items) - len(candidates)),
            "feedback_request/n_sent": float(len(chosen)), "feedback_request/n_imported": float(imported)}


def label_studio_project(studio: dict[str, Any]) -> Any:
    """The `feedback.label_studio` project, with the API token from the environment variable the config names."""
    import os

    from components.label_studio import RankingProject

    key = os.environ.get(studio["api_key_env"], "")
    if not key:
        raise ValueError(f"the environment variable {studio['api_key_env']} (feedback.label_studio.api_key_env) "
                         "is empty: export your Label Studio API token in it (Account & Settings in its UI)")
    return RankingProject(studio["url"], key, studio["project"])


def _candidate_scores(cfg: dict[str, Any], items: list[dict[str, Any]], device: str) -> list[list[list[float]]]:
    """scores[item][reward model][response] under `feedback.reward_models` (zeros when none: random needs none)."""
    from components.scoring import RewardScorer

    per_model = []
    for path in cfg["reward_models"] or []:
        scorer = RewardScorer(str(path), device, None)
        flat = scorer.score([i["prompt"] for i in items for _ in i["responses"]],
                            [r for i in items for r in i["responses"]], cfg["score_batch_size"])
        k = cfg["n_responses"]
        per_model.append([flat[n * k:(n + 1) * k] for n in range(len(items))])
    if not per_model:
        return [[[0.0] * len(i["responses"])] for i in items]
    return [[model[n] for model in per_model] for n in range(len(items))]


def collect_feedback(spec: dict[str, Any], stage_dir: Path, run_id: str) -> dict[str, float]:
    """Human feedback, part 2: the rankings given for this round's candidates as preference pairs that keep their
    annotator; logged as the versioned MLflow dataset the reward model or DPO trains on."""
    from datasets import Dataset

    from components.rankings import RankingSettings, rankings_to_pairs

    rows = [json.loads(line) for line in Path(spec["upstream"]["labels"]["path"]).read_text().splitlines()]
    pairs = rankings_to_pairs(rows, RankingSettings.from_config(spec["config"]["rankings"]), "feedback rankings")
    if not pairs:
        raise ValueError("no ranking gave a preference pair: rank some items in Label Studio (or lower "
                         "feedback.wait.min_labelled) and rerun")
    Dataset.from_list(rows).to_json(str(stage_dir / "rankings.jsonl"), lines=True)
    Dataset.from_list(pairs).to_json(str(stage_dir / "preference.jsonl"), lines=True)
    (stage_dir / "meta.json").write_text(json.dumps({"name": "human-feedback"}))
    load_split({"path": str(stage_dir), "stage": "feedback"}, "preference")  # the labelled set, as an input
    metrics = {"feedback/n_rankings": float(len(rows)), "feedback/n_pairs": float(len(pairs)),
               "feedback/n_annotators": float(len({r["annotator"] for r in rows}))}
    gold = _gold_fn(spec["config"]["gold"])
    if gold is not None:  # how often the annotators' pairs agree with the task's gold reward
        better = gold([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
        worse = gold([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
        metrics["feedback/agreement_with_gold"] = sum(b > w for b, w in zip(better, worse, strict=True)) / len(pairs)
    return metrics
