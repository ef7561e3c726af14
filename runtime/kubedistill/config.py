"""Typed configuration: dataclass groups, YAML recipes, CLI overrides.

Every field name is unique across groups and every KDFlow argument keeps its KDFlow name,
meaning and default, so a KDFlow command line ports by changing the program name. The
canonical spelling on the command line is the flat one (``--kd_ratio 0.3``); the grouped
spelling (``--kd.kd_ratio 0.3``) is accepted too. A recipe is YAML, either flat or nested by
group (``kd: {kd_ratio: 0.3}``). Unknown keys are errors that name the closest valid key.

Fields that KDFlow does not have are ours (marked "kubedistill" in the docstrings of groups).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubedistill import kdflow_flags
from kubedistill.config_values import (
    coerce_value,
    join_uri,
    parse_yaml,
    plain,
    read_recipe,
)
from kubedistill.errors import ConfigError


@dataclass
class ModelConfig:
    student_name_or_path: str | None = None
    teacher_name_or_path: str | None = None
    attn_implementation: str = "flash_attention_2"  # falls back to sdpa without CUDA/flash-attn
    use_liger_kernel: bool = False
    lora_rank: int = 0
    lora_alpha: int = 16
    target_modules: str = "all-linear"
    lora_dropout: float = 0.0
    ring_attn_size: int = 1
    enable_thinking: bool = False
    disable_fast_tokenizer: bool = False
    # kubedistill
    trust_remote_code: bool = False
    student_from_teacher_layers: str | None = None  # e.g. "0,6,12,18,24,29": derive the student
    lora_save_adapters: bool = False  # False: merge LoRA into the final model
    freeze_vision_tower: bool = False  # image-text students: train the language model only
    sglang_dtype: str = "bfloat16"  # dtype of SGLang engines (their "auto" runs fp32 as fp16)


@dataclass
class TrainConfig:
    num_nodes: int = 1
    num_gpus_per_node: int = 8
    num_epochs: int = 1
    train_batch_size: int = 128
    micro_train_batch_size: int = 1
    learning_rate: float = 1e-6
    lr_scheduler: str = "cosine_with_min_lr"
    lr_warmup_ratio: float = 0.05
    min_lr: float = 1e-8
    max_norm: float = 1.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.98)
    backend: str = "fsdp2"
    gradient_checkpointing: bool = False
    gradient_checkpointing_use_reentrant: bool = False
    teacher_offload: bool = False  # KDFlow reads it nowhere; here: same as enable_sleep
    train_enable_sleep: bool = False  # deprecated in KDFlow: turns on enable_sleep
    enable_sleep: bool = False
    full_determinism: bool = False  # transformers.enable_full_determinism(seed)
    load_checkpoint: bool = False  # resume from ckpt_path (same as resume)
    eval_steps: int = -1
    save_steps: int = -1
    save_path: str = "./ckpt/"
    ckpt_path: str = "./ckpt/checkpoints_distill"
    seed: int = 42
    bf16: bool = False
    use_dynamic_bsz: bool = False
    max_token_len_per_gpu: int = 0
    chunked_loss_size: int | None = None  # None: full logits; N: N loss tokens at a time
    local_rank: int = -1  # set by launchers; the LOCAL_RANK env var decides, as in KDFlow
    # KDFlow's checkpoint arguments
    save_training_state: bool = False  # kubedistill checkpoints always hold training state
    resume_training: bool = False  # same as resume
    resume_from: str | None = None  # refused: resume picks the newest checkpoint
    max_ckpt_num: int = -1  # -1: kubedistill keeps the two newest checkpoints
    # kubedistill
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class FSDPConfig:
    fsdp_size: int = -1
    cpu_offload: bool = False


@dataclass
class KDConfig:
    kd_ratio: float = 0.5
    kd_temperature: float = 1.0
    kd_algorithm: str = "vanilla_kd"
    kd_loss_fn: str = "kl"
    teacher_tp_size: int = 8
    teacher_ep_size: int = 1
    teacher_pp_size: int = 1
    teacher_dp_size: int = 1
    teacher_forward_n_batches: int = 1
    teacher_enable_sleep: bool = False  # deprecated in KDFlow: turns on enable_sleep
    teacher_mem_fraction_static: float = 0.4
    teacher_offload_tags: str = "all"
    teacher_quantization: str | None = None
    multi_teacher_config: str | None = None  # refused: one teacher per run
    dskd_token_align: str = "eta"
    dskd_topk_vocab: int = -1
    dskd_projector_lr: float = 1e-4
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    adaptive_alpha: float = 0.5
    hrl_topk: int = 5
    teacher_update_freq: int = 1
    use_ema_teacher: bool = False
    teacher_ema_decay: float = 0.999
    # kubedistill
    kd_temperature_squared: bool = False  # multiply the KD term by T^2 (KDFlow: never)
    self_distillation: bool = False  # the teacher is the student itself (on-policy)
    kd_topk_mode: str = "tail"  # teacher_signal topk: tail bucket | renorm (losses.topk)


@dataclass
class CacheConfig:
    """kubedistill: the teacher hidden-state cache."""

    teacher_backend: str = "auto"  # auto | hf | sglang
    cache_dtype: str = "bf16"  # bf16 | fp16 | fp32 | fp8
    cache_topk: int = 0  # also store top-k teacher log-probs (0: off)
    teacher_signal: str = "hidden"  # hidden | topk (top-k only; KD reads it) | both
    logprobs_path: str | None = None  # import-logprobs: vLLM/SGLang/OpenAI top-k logprobs
    cache_rows_per_shard: int = 256
    cache_verify: bool = True
    teacher_batch_tokens: int = 4096  # token budget of one teacher forward (hf backend)
    num_shards: int = 1
    shard_index: int = -1  # -1: all shards in this process


@dataclass
class RolloutConfig:
    rollout_num_engines: int = 0
    rollout_tp_size: int = 1
    rollout_batch_size: int = 32
    n_samples_per_prompt: int = 1
    generate_max_len: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_enable_sleep: bool = False  # deprecated in KDFlow: turns on enable_sleep
    rollout_mem_fraction_static: float = 0.6
    print_rollout_sample: bool = False  # one sample per rollout -> rollout_samples.jsonl
    # kubedistill
    rollout_backend: str = "auto"  # auto | hf | sglang


@dataclass
class DataConfig:
    train_dataset_path: str | None = None  # comma-separated for a mixture
    train_dataset_probs: str | None = None  # comma-separated, one per dataset
    train_split: str = "train"
    eval_dataset_path: str | None = None
    eval_split: str = "eval"
    input_key: str = "messages"
    output_key: str | None = None
    image_key: str | None = None
    teacher_input_key: str | None = None
    teacher_routing_key: str = "teacher_routing_key"  # multi-teacher KD only (refused)
    label_key: str | None = None
    input_template: str | None = None  # without a chat template: prompt = template.format(x)
    custom_eval_fn: str | None = None  # refused: use eval_task
    apply_chat_template: bool = True
    max_len: int = 4096
    prompt_max_len: int = 2048
    max_samples: int = 100_000_000
    packing_samples: bool = False
    preprocess_num_workers: int = 8
    # kubedistill
    on_bad_row: str = "skip"  # skip | fail
    length_policy: str = "filter"  # filter | truncate
    eval_ratio: float = 0.05  # held-out share when no eval_dataset_path is given
    eval_max_samples: int = 200
    train_all_assistant_turns: bool = False  # False: the last assistant turn only (KDFlow)
    max_image_pixels: int = 4096 * 4096  # width x height above which an image is a bad row


@dataclass
class EvalConfig:
    """kubedistill: the evaluate stage and the quality gate."""

    eval_task: str = "auto"  # auto | gsm8k | rouge | exact_match | none
    eval_metric: str = "eval_ce"  # the key of metrics.json that becomes `score`
    eval_higher_is_better: bool = False
    eval_max_new_tokens: int = 128
    eval_num_generations: int = 32
    min_improvement: float = 0.0


@dataclass
class LoggingConfig:
    """KDFlow's W&B flags, mapped onto MLflow (see kubedistill.kdflow_flags)."""

    logging_steps: int = 10
    use_wandb: bool = False
    wandb_org: str | None = None  # -> MLflow tag "org"
    wandb_project: str | None = None  # -> experiment_name
    wandb_group: str | None = None  # -> MLflow tag "group"
    wandb_run_name: str | None = None  # -> run_name
    wandb_mode: str = "online"  # online | offline (local store) | disabled (tracking off)
    wandb_dir: str | None = None  # -> where the local store lives
    sync_swanlab: bool = False  # refused


@dataclass
class TrackingConfig:
    """kubedistill: MLflow, in place of KDFlow's W&B flags."""

    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in work_dir
    experiment_name: str = "kubedistill"
    run_name: str | None = None
    run_tags: str | None = None  # "key=value,key=value": tags on every run
    registered_model_name: str | None = None  # default: the recipe name
    parent_run_id: str | None = None
    pipeline_run_id: str | None = None
    tracking_end_wait_s: float = 30.0  # at a stage's end, wait this long for a down server


@dataclass
class StorageConfig:
    """kubedistill: where stages read and write (local paths or fsspec URIs)."""

    work_dir: str = "./runs/default"
    prepared_path: str | None = None  # default: {work_dir}/prepared
    teacher_cache_path: str | None = None  # default: {work_dir}/teacher_cache
    model_cache_dir: str | None = None  # packaged models; default: ~/.cache/kubedistill/models


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "fsdp": FSDPConfig,
    "kd": KDConfig,
    "cache": CacheConfig,
    "rollout": RolloutConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
    "tracking": TrackingConfig,
    "storage": StorageConfig,
}

@dataclass
class Config:
    """The whole configuration of a run; one attribute per group."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    # ---- derived locations -------------------------------------------------------------
    @property
    def prepared_path(self) -> str:
        return self.storage.prepared_path or join_uri(self.storage.work_dir, "prepared")

    @property
    def teacher_cache_path(self) -> str:
        return self.storage.teacher_cache_path or join_uri(self.storage.work_dir, "teacher_cache")

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self, flat: bool = False) -> dict[str, Any]:
        grouped = {g: dataclasses.asdict(getattr(self, g)) for g in GROUPS}
        if not flat:
            return {"name": self.name, **grouped}
        out: dict[str, Any] = {"name": self.name}
        for values in grouped.values():
            out.update(values)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(plain(self.to_dict()), sort_keys=False)

    def set(self, key: str, value: Any) -> None:
        """Set one field by flat (``kd_ratio``) or grouped (``kd.kd_ratio``) name."""
        if key == "name":
            self.name = str(value)
            return
        group, fname = _locate(key)
        target = getattr(self, group)
        setattr(target, fname, coerce_value(value, FIELD_TYPES[fname], key))

    def update(self, mapping: dict[str, Any]) -> Config:
        """Set keys from a flat or group-nested mapping (the recipe format)."""
        for key, value in mapping.items():
            if key in GROUPS and isinstance(value, dict):
                for sub, sub_value in value.items():
                    self.set(f"{key}.{sub}", sub_value)
            else:
                self.set(key, value)
        return self

    def validate(self, world_size: int | None = None) -> Config:
        """Check every key of every stage at once (:mod:`kubedistill.validation`); raise one
        ConfigError listing every problem."""
        from kubedistill.validation import validate_config

        kdflow_flags.check(self)
        return validate_config(self, world_size)


# ---- field table ------------------------------------------------------------------------
FIELD_GROUP: dict[str, str] = {}
FIELD_TYPES: dict[str, Any] = {}
for _group, _cls in GROUPS.items():
    for _name, _type in typing.get_type_hints(_cls).items():
        assert _name not in FIELD_GROUP, f"duplicate config field {_name}"
        FIELD_GROUP[_name] = _group
        FIELD_TYPES[_name] = _type


def _locate(key: str) -> tuple[str, str]:
    key = key.replace("-", "_")
    if "." in key:
        group, fname = key.split(".", 1)
        if group in GROUPS and FIELD_GROUP.get(fname) == group:
            return group, fname
    elif key in FIELD_GROUP:
        return FIELD_GROUP[key], key
    valid = list(FIELD_GROUP) + [f"{g}.{f}" for f, g in FIELD_GROUP.items()]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown config key '{key}'{hint}")


def load_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None,
                ) -> Config:
    """Defaults <- recipe YAML (flat or grouped) <- overrides, KDFlow's alias flags mapped
    (:func:`kubedistill.kdflow_flags.apply`), then validate."""
    cfg = Config()
    if recipe is not None:
        data = parse_yaml(read_recipe(recipe), str(recipe)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{recipe}: a recipe must be a mapping")
        cfg.name = Path(recipe).stem
        cfg.update(data)
    return kdflow_flags.apply(cfg.update(overrides or {})).validate()


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``['--kd_ratio', '0.3', '--bf16', '--kd.kd_loss_fn=rkl']`` -> a dict of raw values.

    KDFlow's (HfArgumentParser's) boolean syntaxes: ``--flag``, ``--flag True``,
    ``--flag=false``, and ``--no_flag`` for a flag whose default is True. A flag followed by
    another flag (or nothing) means True. ``--name NAME`` names the run.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument '{token}' (options look like --key value)")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        negated = _negated_bool(key)
        if negated and not eq and value == "true":
            key, value = negated, "false"
        elif key != "name":
            _locate(key)  # fail early on typos, with a suggestion
        out[key] = value
        i += 1
    return out


def _negated_bool(key: str) -> str | None:
    """``no_apply_chat_template`` -> ``apply_chat_template`` (bool fields defaulting to True)."""
    name = key.replace("-", "_")
    if not name.startswith("no_") or name in FIELD_GROUP:
        return None
    field_name = name[3:]
    if FIELD_TYPES.get(field_name) is not bool:
        return None
    default = getattr(GROUPS[FIELD_GROUP[field_name]](), field_name)
    return field_name if default is True else None
