"""Whole-recipe validation: every key of every stage, checked before any stage does work.

:func:`validate_config` is what ``Config.validate`` runs. It collects every problem and
raises ONE :class:`ConfigError` listing them all, so a recipe is fixed in one round trip.
It runs wherever a ``Config`` is made: when a stage loads its config, in ``kubedistill run``
before the first stage, in ``pipeline submit``, and in every KFP component (the open-run
component included). Checks that need files (models, tokenizers, datasets) are not here: they
run at the start of the stage that uses them, before its heavy work.

The checks are data, not code:

- :data:`FIELD_RULES` maps a field name to a :class:`Rule` (a range or a set of choices);
  ``tests/test_validation.py`` fails when a numeric field has no rule, so a new flag cannot
  land unchecked. String fields without a rule are free text (paths, names).
- :data:`REGISTRY_FIELDS` maps a field to the registry that must hold its value
  (``kd_loss_fn`` -> losses, ``kd_algorithm`` -> algorithms), plugins included.
- :data:`CROSS_RULES` are ``(message, predicate)`` pairs over the whole config.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubedistill.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """``low <= value <= high`` (strict where ``*_open``), ``value in choices``, or ``value in
    also`` (sentinels such as -1 for "off"). None passes (optional fields)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    also: tuple[Any, ...] = ()

    def problem(self, name: str, value: Any) -> str | None:
        if value is None or value in self.also:
            return None
        if self.choices:
            if value in self.choices:
                return None
            close = difflib.get_close_matches(str(value), self.choices, n=1, cutoff=0.3)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return f"{name} must be one of {', '.join(self.choices)}, got '{value}'{hint}"
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            too_low = v <= self.low if self.low_open else v < self.low
            too_high = v >= self.high if self.high_open else v > self.high
            if too_low or too_high or (isinstance(v, float) and math.isnan(v)):
                return f"{name} must be {self.describe()}, got {value}"
        return None

    def describe(self) -> str:
        parts = []
        if self.low > -math.inf and self.high < math.inf:
            parts.append(f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                         f"{_num(self.high)}{')' if self.high_open else ']'}")
        elif self.low > -math.inf:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        elif self.high < math.inf:
            parts.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        if self.also:
            parts.append(" or ".join(str(a) for a in self.also))
        return " or ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Rule(low=1)  # integers >= 1
NON_NEGATIVE = Rule(low=0)
POSITIVE_REAL = Rule(low=0, low_open=True)
UNIT = Rule(low=0, high=1)
OPEN_UNIT = Rule(low=0, high=1, low_open=True, high_open=True)
FRACTION = Rule(low=0, high=1, low_open=True)  # (0, 1]
OFF_OR_POSITIVE = Rule(low=1, also=(-1,))


def choice(*names: str) -> Rule:
    return Rule(choices=names)


FIELD_RULES: dict[str, Rule] = {
    # model
    "attn_implementation": choice("flash_attention_2", "sdpa", "eager"),
    "sglang_dtype": choice("bfloat16", "float16", "float32", "auto"),
    "lora_rank": NON_NEGATIVE, "lora_alpha": POSITIVE,
    "lora_dropout": Rule(low=0, high=1, high_open=True), "ring_attn_size": POSITIVE,
    # train
    "num_nodes": POSITIVE, "num_gpus_per_node": POSITIVE, "num_epochs": POSITIVE,
    "train_batch_size": POSITIVE, "micro_train_batch_size": POSITIVE,
    "learning_rate": POSITIVE_REAL, "lr_warmup_ratio": UNIT, "min_lr": NON_NEGATIVE,
    "max_norm": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "adam_betas": Rule(low=0, high=1, high_open=True), "backend": choice("fsdp2"),
    "eval_steps": OFF_OR_POSITIVE, "save_steps": OFF_OR_POSITIVE, "seed": NON_NEGATIVE,
    "max_token_len_per_gpu": NON_NEGATIVE, "chunked_loss_size": POSITIVE,
    "max_steps": OFF_OR_POSITIVE, "device": choice("auto", "cpu", "cuda"),
    "local_rank": Rule(low=-1), "max_ckpt_num": OFF_OR_POSITIVE,
    # fsdp
    "fsdp_size": OFF_OR_POSITIVE,
    # kd
    "kd_ratio": UNIT, "kd_temperature": POSITIVE_REAL, "teacher_tp_size": POSITIVE,
    "teacher_ep_size": POSITIVE, "teacher_pp_size": POSITIVE, "teacher_dp_size": POSITIVE,
    "teacher_forward_n_batches": POSITIVE, "teacher_mem_fraction_static": OPEN_UNIT,
    "dskd_token_align": choice("eta", "cma"), "dskd_topk_vocab": OFF_OR_POSITIVE,
    "dskd_projector_lr": POSITIVE_REAL, "jsd_beta": UNIT, "skew_lambda": UNIT,
    "adaptive_alpha": UNIT, "hrl_topk": POSITIVE, "teacher_update_freq": POSITIVE,
    "teacher_ema_decay": OPEN_UNIT, "kd_topk_mode": choice("tail", "renorm"),
    # cache
    "teacher_backend": choice("auto", "hf", "sglang"),
    "cache_dtype": choice("bf16", "fp16", "fp32", "fp8"), "cache_topk": NON_NEGATIVE,
    "teacher_signal": choice("hidden", "topk", "both"),
    "cache_rows_per_shard": POSITIVE, "teacher_batch_tokens": POSITIVE, "num_shards": POSITIVE,
    "shard_index": Rule(low=0, also=(-1,)),
    # rollout
    "rollout_num_engines": NON_NEGATIVE, "rollout_tp_size": POSITIVE,
    "rollout_batch_size": POSITIVE, "n_samples_per_prompt": POSITIVE,
    "generate_max_len": POSITIVE, "temperature": NON_NEGATIVE, "top_p": FRACTION,
    "rollout_mem_fraction_static": OPEN_UNIT,
    "rollout_backend": choice("auto", "hf", "sglang"),
    # data
    "max_image_pixels": POSITIVE,
    "max_len": POSITIVE, "prompt_max_len": POSITIVE, "max_samples": POSITIVE,
    "preprocess_num_workers": NON_NEGATIVE, "on_bad_row": choice("skip", "fail"),
    "length_policy": choice("filter", "truncate"),
    "eval_ratio": Rule(low=0, high=1, high_open=True), "eval_max_samples": NON_NEGATIVE,
    # eval
    "eval_task": choice("auto", "gsm8k", "rouge", "exact_match", "none"), "eval_max_new_tokens": POSITIVE,
    "eval_num_generations": NON_NEGATIVE, "min_improvement": NON_NEGATIVE,
    # logging, tracking
    "logging_steps": POSITIVE, "tracking_end_wait_s": NON_NEGATIVE,
}


def _losses():
    from kubedistill.losses import LOSSES

    return LOSSES


def _algorithms():
    from kubedistill.algorithms import ALGORITHMS

    return ALGORITHMS


def _schedules():
    from kubedistill.train.optim import SCHEDULES

    return SCHEDULES


#: field -> a function returning the names its value may take (a registry, plugins loaded)
REGISTRY_FIELDS: dict[str, Callable[[], Any]] = {
    "kd_loss_fn": _losses, "kd_algorithm": _algorithms, "lr_scheduler": _schedules,
}


def _is_default(cfg, name: str) -> bool:
    """True when ``name`` holds its dataclass default (a key the recipe left alone: the
    default ``prompt_max_len`` is not held against a recipe that only lowers ``max_len``)."""
    from kubedistill.config import FIELD_GROUP

    group = getattr(cfg, FIELD_GROUP[name])
    return getattr(group, name) == getattr(type(group)(), name)


def _probs_match(cfg) -> bool:
    from kubedistill.config_values import split_list

    d = cfg.data
    if not (d.train_dataset_probs and d.train_dataset_path):
        return True
    return len(split_list(d.train_dataset_probs)) == len(split_list(d.train_dataset_path))


#: (message, predicate that must hold); the message may use ``{cfg}``
CROSS_RULES: list[tuple[str, Callable[[Any], bool]]] = [
    ("prompt_max_len ({cfg.data.prompt_max_len}) must be <= max_len ({cfg.data.max_len})",
     lambda c: c.data.prompt_max_len <= c.data.max_len or _is_default(c, "prompt_max_len")),
    ("micro_train_batch_size ({cfg.train.micro_train_batch_size}) must be <= "
     "train_batch_size ({cfg.train.train_batch_size})",
     lambda c: c.train.micro_train_batch_size <= c.train.train_batch_size),
    ("min_lr ({cfg.train.min_lr}) must be <= learning_rate ({cfg.train.learning_rate})",
     lambda c: c.train.min_lr <= c.train.learning_rate),
    ("use_dynamic_bsz needs max_token_len_per_gpu > 0",
     lambda c: not c.train.use_dynamic_bsz or c.train.max_token_len_per_gpu > 0),
    ("train_dataset_probs needs one entry per train_dataset_path entry "
     "({cfg.data.train_dataset_probs!r} vs {cfg.data.train_dataset_path!r})", _probs_match),
    ("teacher_signal {cfg.cache.teacher_signal} needs cache_topk > 0",
     lambda c: c.cache.teacher_signal == "hidden" or c.cache.cache_topk > 0),
    ("shard_index {cfg.cache.shard_index} must be < num_shards {cfg.cache.num_shards}",
     lambda c: c.cache.shard_index < c.cache.num_shards),
]


def problems(cfg, world_size: int | None = None) -> list[str]:
    """Every problem of ``cfg`` (empty when it is valid)."""
    from kubedistill.config import FIELD_GROUP

    found: list[str] = []
    for name, group in FIELD_GROUP.items():
        rule = FIELD_RULES.get(name)
        if rule is not None:
            msg = rule.problem(name, getattr(getattr(cfg, group), name))
            if msg:
                found.append(msg)
    for name, names in REGISTRY_FIELDS.items():
        value = getattr(getattr(cfg, FIELD_GROUP[name]), name)
        registry = names()
        if value not in registry:
            valid = sorted(registry)
            close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.3)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            found.append(f"{name} '{value}' is not registered{hint} (valid: "
                         f"{', '.join(valid)})")
    if found:  # cross-field rules assume each field is sane on its own
        return found
    for message, holds in CROSS_RULES:
        if not holds(cfg):
            found.append(message.format(cfg=cfg))
    if world_size is not None and not cfg.train.use_dynamic_bsz:
        per_step = cfg.train.micro_train_batch_size * world_size
        if cfg.train.train_batch_size % per_step:
            found.append(
                f"train_batch_size {cfg.train.train_batch_size} is not divisible by "
                f"micro_train_batch_size {cfg.train.micro_train_batch_size} x world size "
                f"{world_size}; choose train_batch_size as a multiple of {per_step}")
    return found


def validate_config(cfg, world_size: int | None = None):
    """Raise one ConfigError listing every problem of ``cfg``; return ``cfg`` when valid."""
    found = problems(cfg, world_size)
    if len(found) == 1:
        raise ConfigError(f"recipe '{cfg.name}': {found[0]}")
    if found:
        raise ConfigError(f"recipe '{cfg.name}' has {len(found)} problems: "
                          + "; ".join(found))
    return cfg
