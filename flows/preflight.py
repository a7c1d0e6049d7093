"""Preflight: the checks that read the machine, files, models and the environment, before anything starts.

`flows.config.validate_config` checks values; `preflight(cfg)` checks what they point at. The CLI calls both before
it starts the Prefect flow (so a bad file fails in seconds, not after the Prefect server's start-up), and the flow
calls them again when started another way (a deployment, a notebook). Every failure is a `ConfigError` or a
`components.data.DatasetValidationError` whose one-line message names the config field or file and the fix;
nothing is trained and no MLflow run is opened. In order:

1. machine: a CUDA device or bf16/fp16 asked for where torch sees no GPU;
2. trainer args: each TRL `args` node the pipeline uses is instantiated, so TRL's and transformers' own checks run;
3. judge (AI-feedback pipelines): its settings and principles, and the API key's environment variable;
4. models: every checkpoint named exists, is a model (config.json and weights), has the right head (causal LM,
   scalar reward head) and, for the policy, a tokenizer; lengths in the config fit the model's context;
5. data (`data=files`): every split loads and validates (see components.data), conversational data has a chat
   template, and prompts leave room for an answer within each trainer's max_length and the model's context.

A config that passed (same values, same files, same environment) is not checked twice in one process.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from components.errors import DatasetValidationError
from flows.config import ConfigError, select, trainer_stages

log = logging.getLogger("alignflow")

#: Tokens an answer needs after its prompt within a trainer's max_length.
MIN_ANSWER = 8
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: Fields that may name a CUDA device, and trainer flags that need a GPU.
DEVICE_FIELDS = ("device", "judge.settings.device")
GPU_FLAGS = ("bf16", "fp16")
#: Judge kind -> (module, settings class) of components.judges.
JUDGE_SETTINGS = {
    "constitution": ("components.judges.constitution", "ConstitutionSettings"),
    "llm": ("components.judges.llm", "LLMSettings"),
    "openai_compatible": ("components.judges.openai_compatible", "HTTPSettings"),
    "reward_model": ("components.judges.reward_model", "RewardModelSettings"),
}
#: Length fields and how much room they must leave in the model's context (max_new_tokens: at least a prompt token).
CONTEXT_FIELDS = {"sft.args.max_length": 0, "reward.args.max_length": 0, "dpo.args.max_length": 0,
                  "rl.max_new_tokens": 1, "eval.max_new_tokens": 1}
#: Trainer stage -> the data split it trains on.
TRAIN_SPLITS = {"sft": "sft", "reward": "preference", "dpo": "preference"}
#: Splits whose prompts are sampled from (PPO/RLOO/GRPO rollouts, evaluation): no truncation there.
GENERATION_SPLITS = ("prompts", "eval_prompts")
_PASSED: set[str] = set()
#: Fingerprints of configs that passed, remembered per store (the newest PASSED_KEPT) for later processes.
PASSED_FILE, PASSED_KEPT = "preflight_passed.json", 256
#: Installed packages whose versions decide what the checks accept (TRL's args, model loading, CUDA).
CHECKED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def preflight(cfg: dict[str, Any]) -> None:
    """Run every check on a validated config; raise ConfigError or DatasetValidationError at the first problem.

    A config that passed before, on this machine with these packages and the same files (its fingerprint), is not
    checked again, in this process or a later one using the same store: a rerun whose stages are all cached then
    imports no ML library. Servers a config needs (`check_feedback`) are asked every time."""
    key = _fingerprint(cfg)
    store = Path(cfg["paths"]["root_dir"]) / ".alignflow" / PASSED_FILE
    if key in _PASSED or key in _read_passed(store):
        check_feedback(cfg)
        _PASSED.add(key)
        return
    check_machine(cfg)
    check_scaling(cfg)
    check_trainer_args(cfg)
    check_judge(cfg)
    check_feedback(cfg)
    configs = check_models(cfg)
    context, tokenizer = _policy(cfg, configs)
    _check_context_fields(cfg, configs, context)
    if cfg["data"]["source"] == "files":
        check_data(cfg, context, tokenizer)
    _PASSED.add(key)
    _remember_passed(store, key)


def _read_passed(store: Path) -> list[str]:
    try:
        keys = json.loads(store.read_text())
    except (OSError, ValueError):
        return []
    return keys if isinstance(keys, list) else []


def _remember_passed(store: Path, key: str) -> None:
    """Add `key` to the store's list (written whole, then renamed: a reader never sees half a file)."""
    keys = [k for k in _read_passed(store) if k != key][-(PASSED_KEPT - 1):] + [key]
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(keys))
        os.replace(tmp, store)
    except OSError as err:  # a read-only store only costs the checks next time
        log.debug("could not remember the passed preflight in %s: %s", store, err)


def one_line(err: BaseException) -> str:
    """An error message on one line (whitespace runs collapsed)."""
    return " ".join(str(err).split())


# ---------------------------------------------------------------------------------------------------- helpers
def _reason(err: BaseException) -> str:
    """`Type: first line` of an error, unwrapping Hydra's InstantiationException to TRL's own error."""
    if type(err).__name__ == "InstantiationException" and err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _invalid(field: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"config field `{field}` = {value!r} is invalid: {fix}")


def _versions() -> dict[str, str | None]:
    found = {}
    for name in CHECKED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _fingerprint(cfg: dict[str, Any]) -> str:
    """The config plus what preflight read outside it: the files it names, the judge's key variable, the machine
    (host, CPUs, visible GPUs) and the versions of the packages the checks ask."""
    paths = [select(cfg, f"data.{k}.path") for k in ("sft", "preference", "preference_eval", "prompts")]
    paths += [select(cfg, field) for field, _, _ in MODEL_FIELDS]
    stats = {}
    for path in filter(None, paths):
        try:
            stat = Path(path).expanduser().stat()
            stats[path] = [stat.st_size, stat.st_mtime_ns]
        except (OSError, TypeError):
            stats[str(path)] = None
    env = select(cfg, "judge.settings.api_key_env")
    machine = [socket.gethostname(), os.cpu_count(), os.environ.get("CUDA_VISIBLE_DEVICES")]
    blob = json.dumps([cfg, stats, bool(env and os.environ.get(str(env))), machine, _versions()], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- machine
def check_machine(cfg: dict[str, Any]) -> None:
    """CUDA asked for (device, or bf16/fp16 in a trainer's args) on a machine where torch sees no GPU. Torch is
    imported only when something asks for CUDA (`auto` and `cpu` never fail here)."""
    if cfg["num_threads"] and cfg["num_threads"] > (os.cpu_count() or 1):
        log.warning("num_threads=%d is more than this machine's %d CPUs", cfg["num_threads"], os.cpu_count())
    devices = [(field, value) for field in DEVICE_FIELDS
               if isinstance(value := select(cfg, field), str) and value.startswith("cuda")]
    flags = [(stage, flag) for stage in trainer_stages(cfg) for flag in GPU_FLAGS if cfg[stage]["args"].get(flag)]
    if not devices and not flags:
        return
    import torch

    if torch.cuda.is_available():
        return
    why = f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else "torch sees no GPU"
    if devices:  # the first field that asks, as before: device, then the trainers' flags
        field, value = devices[0]
        raise _invalid(field, value, f"no CUDA GPU on this machine ({why}); use device=auto or device=cpu")
    stage, flag = flags[0]
    raise _invalid(f"{stage}.args.{flag}", True, f"it needs a CUDA GPU ({why}); drop +trainer=gpu "
                   f"or set {stage}.args.{flag}=false")


def check_scaling(cfg: dict[str, Any]) -> None:
    """`accelerate`: the GPUs and packages a launching option needs; `peft`: the LoRA settings PEFT accepts."""
    from flows.launch import launched

    accelerate, peft = cfg.get("accelerate"), cfg.get("peft") or {"method": "none"}
    if launched(accelerate):
        _check_launch_machine(accelerate)
        _warn_about_rl(cfg, accelerate)
    if peft["method"] == "lora":
        from components.training import lora_config

        settings = {k: v for k, v in peft.items() if k not in ("method", "stages")}
        try:
            lora_config(settings, "CAUSAL_LM")
        except Exception as err:  # unknown keys: TypeError; bad values: ValueError
            raise ConfigError(f"config field `peft` (peft.LoraConfig) is rejected by PEFT: {_reason(err)}") from err


def _warn_about_rl(cfg: dict[str, Any], accelerate: dict[str, Any]) -> None:
    """Say what a launching option does not do for the RL stage: RLOO and GRPO stay in one process; our PPO is
    plain data parallel, with whole models in every process, whatever sharding the option asks of TRL stages."""
    from flows.launch import LAUNCHED_STAGES

    if cfg["pipeline"]["optimizer"] != "rl":
        return
    algorithm = cfg["rl"]["algorithm"]
    if algorithm != "ppo":
        log.warning("accelerate=%s runs %s under `accelerate launch`; rl=%s still trains in one process",
                    accelerate["name"], ", ".join(s for s in LAUNCHED_STAGES if s != "ppo"), algorithm)
    elif accelerate["config"].get("distributed_type") in ("DEEPSPEED", "FSDP"):
        log.warning("accelerate=%s shards sft, reward and dpo; rl=ppo runs data parallel with the whole policy, "
                    "reference and reward model in each of its %s processes", accelerate["name"],
                    accelerate["num_processes"])


def _check_launch_machine(accelerate: dict[str, Any]) -> None:
    """GPU processes need as many CUDA GPUs; DeepSpeed needs its package."""
    from importlib.util import find_spec

    kind, n = accelerate["config"].get("distributed_type"), accelerate["num_processes"]
    if kind == "DEEPSPEED" and find_spec("deepspeed") is None:
        raise _invalid("accelerate.config.distributed_type", kind, "the deepspeed package is not installed: "
                       "`pip install deepspeed` into alignflow's environment (needs CUDA GPUs), or use "
                       "accelerate=ddp or accelerate=fsdp")
    if accelerate["config"].get("use_cpu"):
        return
    import torch

    gpus = torch.cuda.device_count()
    if gpus < n:
        raise _invalid("accelerate.num_processes", n, f"accelerate={accelerate['name']} runs one process per GPU "
                       f"and torch sees {gpus}; set accelerate.num_processes={gpus}" if gpus else
                       f"accelerate={accelerate['name']} runs one process per GPU and torch sees none; use "
                       "accelerate=cpu_ddp (CPU processes) or accelerate=none")


def check_trainer_args(cfg: dict[str, Any]) -> None:
    """Instantiate every TRL `args` node the pipeline uses, so TRL's and transformers' own checks run now."""
    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory() as tmp:
        for stage in trainer_stages(cfg):
            node = cfg[stage]["args"]
            try:
                instantiate(node, output_dir=str(Path(tmp) / stage))
            except Exception as err:  # TRL/transformers raise ValueError; unknown keys a TypeError
                raise ConfigError(f"config field `{stage}.args` ({node.get('_target_')}) is rejected by "
                                  f"TRL/transformers: {_reason(err)}") from err


# ------------------------------------------------------------------------------------------------------ judge
def check_feedback(cfg: dict[str, Any]) -> None:
    """feedback=human_loop: the Label Studio token is exported and the server answers; a run that pauses for
    rankings needs a Prefect server to be resumed through (a temporary one dies with the process)."""
    feedback = cfg.get("feedback") or {}
    if not feedback.get("loop"):
        return
    import httpx

    studio = feedback["label_studio"]
    env = studio["api_key_env"]
    if not os.environ.get(env):
        raise ConfigError(f"environment variable `{env}` (named by config field `feedback.label_studio.api_key_env`)"
                          f" is not set: export {env}=<your Label Studio API token> (Account & Settings in its UI)")
    url = studio["url"].rstrip("/")
    try:
        httpx.get(f"{url}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise ConfigError(f"Label Studio at {url} (config field `feedback.label_studio.url`) does not answer "
                          f"({one_line(err)}): start it (`make label-studio`, see the README) or fix the URL") from err
    if feedback["wait"]["mode"] == "pause":
        from flows.prefect_run import answering_api

        answering_api(ConfigError, "feedback.wait.mode=pause needs a Prefect server to resume the paused run "
                      "through: start one (`prefect server start`) and export PREFECT_API_URL, or use "
                      "feedback.wait.mode=poll")


def check_judge(cfg: dict[str, Any]) -> None:
    """AI-feedback pipelines: the judge's kind, settings and principles, and its API key's variable."""
    if cfg["pipeline"]["feedback"] != "ai":
        return
    from components.judges.base import parse_principles, settings_from

    judge = cfg["judge"]
    if judge.get("kind") not in JUDGE_SETTINGS:
        raise _invalid("judge.kind", judge.get("kind"), f"choose a judge group: judge={'|'.join(JUDGE_SETTINGS)}")
    module, name = JUDGE_SETTINGS[judge["kind"]]
    try:
        parse_principles(judge["principles"])
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"config field `judge.principles` is invalid: {one_line(err)}") from err
    try:
        settings_from(getattr(importlib.import_module(module), name), judge["kind"], judge["settings"])
    except (ValueError, TypeError) as err:  # settings name the field first: "<field> = <value> is invalid: …"
        field = re.match(r"(\w+) = ", str(err))
        where = f"judge.settings.{field.group(1)}" if field else "judge.settings"
        message = str(err)[len(field.group(1)) + 1:] if field else f"is invalid: {err}"
        raise ConfigError(f"config field `{where}` {message}") from err
    env = judge["settings"].get("api_key_env") if judge["kind"] == "openai_compatible" else None
    if env and not os.environ.get(env):
        raise ConfigError(f"environment variable `{env}` (named by config field `judge.settings.api_key_env`) is "
                          f"not set: export {env}=<your API key>, or set judge.settings.api_key_env=null for a "
                          "server that needs no key")


# ----------------------------------------------------------------------------------------------------- models
def _architectures(config: Any) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def _is_causal(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = _architectures(config)
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _is_scalar(config: Any) -> bool:
    archs = _architectures(config)
    return any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels == 1


def _can_score(config: Any) -> bool:
    """A reward model to train: a causal LM (a new scalar head on its body) or a one-output classifier."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if any(a.endswith("ForSequenceClassification") for a in _architectures(config)):
        return config.num_labels == 1
    return config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and _is_causal(config)


#: Role -> (does a config fit it, what to give instead).
HEADS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "causal": (_is_causal, "give a causal language model checkpoint (…ForCausalLM), e.g. openai-community/gpt2"),
    "reward": (_can_score, "give a causal LM or a sequence-classification model with one output (num_labels=1)"),
    "scalar": (_is_scalar, "give a reward model: sequence classification with one scalar output (num_labels=1)"),
}
#: Every config field that names a checkpoint: (field, role, whether this pipeline loads it).
MODEL_FIELDS: tuple[tuple[str, str, Callable[[dict[str, Any]], bool]], ...] = (
    ("model.name_or_path", "causal", lambda cfg: True),
    ("reward.model_name_or_path", "reward", lambda cfg: cfg["pipeline"]["optimizer"] == "rl"),
    ("revision.model_name_or_path", "causal", lambda cfg: bool(cfg["pipeline"].get("revise"))),
    ("judge.settings.model", "causal", lambda cfg: cfg["pipeline"]["feedback"] == "ai"
     and cfg["judge"]["kind"] == "llm"),
    ("judge.settings.path", "scalar", lambda cfg: cfg["pipeline"]["feedback"] == "ai"
     and cfg["judge"]["kind"] == "reward_model"),
)


def _model_config(field: str, value: Any) -> Any:
    """The checkpoint's config: a local directory must hold config.json and weights; a hub id must load."""
    from transformers import AutoConfig

    if not isinstance(value, str) or not value.strip():
        raise _invalid(field, value, "give a hub id or a local checkpoint directory")
    path = Path(value).expanduser()
    if path.is_file():
        raise _invalid(field, value, "it is a file; give the checkpoint's directory (with config.json)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise _invalid(field, value, "the directory is not a model (no config.json); give a folder written by "
                       "save_pretrained, or a hub id")
    if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise _invalid(field, value, f"the directory has config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    if not path.exists() and (value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value):
        raise _invalid(field, value, "no such directory; give a local checkpoint directory or a hub id such as "
                       "openai-community/gpt2")
    try:
        return AutoConfig.from_pretrained(value)
    except Exception as err:  # unknown hub id, offline without a cached copy, unreadable config.json
        offline = " (offline: HF_HUB_OFFLINE=1 and not in the cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise _invalid(field, value, f"it could not be loaded{offline}: {_reason(err)}") from err


def check_models(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every checkpoint the pipeline loads exists and has the right head; returns their configs by field."""
    configs = {}
    for field, role, used in MODEL_FIELDS:
        value = select(cfg, field)
        if value is None or not used(cfg):
            continue
        config = _model_config(field, value)
        fits, fix = HEADS[role]
        if not fits(config):
            kind = (_architectures(config) or [config.model_type])[0]
            raise _invalid(field, value, f"it is a {kind} checkpoint; {fix}")
        configs[field] = config
    return configs


def _policy(cfg: dict[str, Any], configs: dict[str, Any]) -> tuple[int | None, Any]:
    """The policy's context length and tokenizer (None for the embedded model: it is trained from the data)."""
    from transformers import AutoConfig

    from components.modeling import context_length, load_tokenizer

    name = cfg["model"]["name_or_path"]
    if name is None:
        arch = dict(cfg["model"]["init"]["arch"])
        try:
            return context_length(AutoConfig.for_model(arch.pop("model_type", None), **arch)), None
        except Exception as err:  # unknown model_type or an argument its config rejects
            raise ConfigError(f"config field `model.init.arch` is invalid: {_reason(err)}") from err
    try:
        tokenizer = load_tokenizer(name)
    except Exception as err:
        raise _invalid("model.name_or_path", name, f"its tokenizer could not be loaded ({_reason(err)}); save "
                       "the tokenizer into the checkpoint with save_pretrained") from err
    return context_length(configs["model.name_or_path"]), tokenizer


def _check_context_fields(cfg: dict[str, Any], configs: dict[str, Any], context: int | None) -> None:
    """Trainers' max_length and the sampling budgets must fit the model's context."""
    from components.modeling import context_length

    stages = set(trainer_stages(cfg)) | {"rl", "eval"}
    for field, room in CONTEXT_FIELDS.items():
        value, limit = select(cfg, field), context
        if field.startswith("reward.") and "reward.model_name_or_path" in configs:
            limit = context_length(configs["reward.model_name_or_path"])
        if field.split(".")[0] in stages and isinstance(value, int) and limit and value > limit - room:
            raise _invalid(field, value, f"the model's context is {limit} tokens; use at most {limit - room}")


# ------------------------------------------------------------------------------------------------------- data
def _split_field(cfg: dict[str, Any], split: str) -> str:
    """The config node a normalised split comes from (for messages)."""
    data = cfg["data"]
    if split == "sft":
        return "data.sft"
    if split in GENERATION_SPLITS and data["prompts"] is not None:
        return "data.prompts"
    if split in ("preference_eval", "eval_prompts") and data["preference_eval"] is not None:
        return "data.preference_eval"
    return "data.preference"


def _where(cfg: dict[str, Any], split: str) -> str:
    field = _split_field(cfg, split)
    return f"`{field}`: {select(cfg, field + '.path')}"


def _is_conversational(ds: Any) -> bool:
    return len(ds) > 0 and any(isinstance(ds[0][column], list) for column in ds.column_names)


def _prompt_lengths(ds: Any, tokenizer: Any) -> list[int]:
    """Tokens of each row's prompt as the model sees it (conversations through the chat template)."""
    if "prompt" not in ds.column_names:
        return []
    texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in ds["prompt"]]
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def check_data(cfg: dict[str, Any], context: int | None, tokenizer: Any) -> None:
    """Load and validate every split, then check chat template and prompt lengths against the model."""
    from components.data import load_file_splits

    splits = load_file_splits(cfg["data"])
    if tokenizer is None:  # the embedded model: its tokenizer is trained on these splits, as the SFT stage does
        from components.modeling import train_tokenizer
        from components.review_task import corpus

        tokenizer = train_tokenizer(corpus({k: v.to_list() for k, v in splits.items()}),
                                    cfg["model"]["init"]["vocab_size"])
    talks = [split for split, ds in splits.items() if _is_conversational(ds)]
    if talks and not getattr(tokenizer, "chat_template", None):
        raise _invalid("model.name_or_path", cfg["model"]["name_or_path"],
                       f"its tokenizer has no chat template, but {_where(cfg, talks[0])} holds conversations "
                       "(message lists); use a chat model (e.g. model=qwen2_5_0_5b_instruct), add a chat_template "
                       "to the checkpoint's tokenizer, or give the data as plain strings")
    if context:
        _check_generation_lengths(cfg, splits, tokenizer, context)
    _check_training_lengths(cfg, splits, tokenizer, context)


def _check_generation_lengths(cfg: dict[str, Any], splits: dict[str, Any], tokenizer: Any, context: int) -> None:
    """Sampling does not truncate: every prompt plus the completion budget must fit the context."""
    budget = max(cfg["rl"]["max_new_tokens"], cfg["eval"]["max_new_tokens"])
    for split in GENERATION_SPLITS:
        lengths = _prompt_lengths(splits[split], tokenizer)
        over = [n for n in lengths if n + budget > context]
        if over:
            raise DatasetValidationError(
                f"{_where(cfg, split)}: {len(over)} of {len(lengths)} prompts (longest {max(over)} tokens) plus "
                f"{budget} new tokens (rl/eval.max_new_tokens) exceed the model's context of {context} tokens: "
                "shorten or drop those prompts, lower rl.max_new_tokens, or use a model with a longer context"
            )


def _check_training_lengths(cfg: dict[str, Any], splits: dict[str, Any], tokenizer: Any,
                            context: int | None) -> None:
    """Each trainer truncates to max_length: prompts must leave room for an answer (all: error; some: warning)."""
    for stage in trainer_stages(cfg):
        if stage not in TRAIN_SPLITS:
            continue
        max_length = cfg[stage]["args"].get("max_length") or context
        limit = min(filter(None, (max_length, context)), default=None)
        lengths = _prompt_lengths(splits[TRAIN_SPLITS[stage]], tokenizer)
        cut = [n for n in lengths if limit and n + MIN_ANSWER > limit]
        if lengths and len(cut) == len(lengths):
            raise DatasetValidationError(
                f"{_where(cfg, TRAIN_SPLITS[stage])}: every prompt (shortest {min(lengths)} tokens) leaves fewer "
                f"than {MIN_ANSWER} tokens for the answer within {limit} tokens (`{stage}.args.max_length`, model "
                f"context {context}): use shorter prompts, a larger {stage}.args.max_length, or a longer-context model"
            )
        if cut:
            log.warning("%s: %d of %d prompts leave fewer than %d tokens for the answer within %s.args.max_length "
                        "= %d; their answers are cut", _where(cfg, TRAIN_SPLITS[stage]), len(cut), len(lengths),
                        MIN_ANSWER, stage, limit)
