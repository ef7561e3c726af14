"""KDFlow flags that act through kubedistill's own settings, and the ones it refuses.

:func:`apply` maps (idempotently; :func:`kubedistill.config.load_config` and every pipeline
component call it before ``validate()``):

- ``train_enable_sleep`` / ``teacher_enable_sleep`` / ``rollout_enable_sleep`` (deprecated in
  KDFlow) and ``teacher_offload`` -> ``enable_sleep``, with a warning, as KDFlow does;
- ``load_checkpoint`` / ``resume_training`` -> ``resume`` (from the newest checkpoint under
  ``ckpt_path``);
- with ``use_wandb``: ``wandb_project`` -> MLflow experiment, ``wandb_run_name`` -> run name,
  ``wandb_group`` / ``wandb_org`` -> tags ``group`` / ``org``, ``wandb_mode offline`` -> the
  local store ``sqlite:///{wandb_dir or work_dir}/mlflow.db`` (no server is contacted, even
  with ``$MLFLOW_TRACKING_URI`` set), ``wandb_mode disabled`` -> tracking off. One info line
  says what was mapped.

:func:`check` (called from ``Config.validate``) refuses, with the reason, what kubedistill
does not do: ``ring_attn_size > 1``, ``sync_swanlab``, ``multi_teacher_config``,
``custom_eval_fn``, ``resume_from``, ``max_ckpt_num`` other than -1, an ``input_template`` without ``{}`` or used with a chat
template, a ``backend`` other than fsdp2, and an unknown ``wandb_mode``. Device-dependent
refusals (``cpu_offload`` and ``use_liger_kernel`` on CPU) happen where the device is known:
:mod:`kubedistill.train.fsdp` and :mod:`kubedistill.train.student`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kubedistill.errors import ConfigError

log = logging.getLogger("kubedistill.kdflow")
WANDB_MODES = ("online", "offline", "disabled")
_said: set[str] = set()  # messages already logged by this process (configs resolve often)
_SLEEP_FLAGS = ("train.train_enable_sleep", "kd.teacher_enable_sleep",
                "rollout.rollout_enable_sleep", "train.teacher_offload")


def _once(level: int, message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.log(level, message)


def _get(cfg: Any, dotted: str) -> Any:
    group, name = dotted.split(".")
    return getattr(getattr(cfg, group), name)


def apply(cfg: Any) -> Any:
    """Map KDFlow's alias flags onto kubedistill's settings (see the module docstring)."""
    sleepers = [d.split(".")[1] for d in _SLEEP_FLAGS if _get(cfg, d)]
    if sleepers and not cfg.train.enable_sleep:
        _once(logging.WARNING, f"--{' --'.join(sleepers)}: deprecated in KDFlow; turning on "
              "--enable_sleep (engines release GPU memory while the student trains)")
        cfg.train.enable_sleep = True
    if cfg.train.load_checkpoint or cfg.train.resume_training:
        cfg.train.resume = True
    _map_wandb(cfg)
    return cfg


def _map_wandb(cfg: Any) -> None:
    lg, tr = cfg.logging, cfg.tracking
    given = {k: getattr(lg, k) for k in ("wandb_org", "wandb_project", "wandb_group",
                                         "wandb_run_name", "wandb_dir") if getattr(lg, k)}
    if not lg.use_wandb:
        if given:
            _once(logging.INFO, f"W&B flags {', '.join(sorted(given))} given without "
                  "--use_wandb True: unused, as in KDFlow")
        return
    mapped = []
    if lg.wandb_project:
        tr.experiment_name = lg.wandb_project
        mapped.append(f"project '{lg.wandb_project}' -> experiment")
    if lg.wandb_run_name:
        tr.run_name = lg.wandb_run_name
        mapped.append(f"run name '{lg.wandb_run_name}' -> run name")
    tags = dict(parse_tags(tr.run_tags))
    for flag, tag in (("wandb_group", "group"), ("wandb_org", "org")):
        if getattr(lg, flag):
            tags[tag] = getattr(lg, flag)
            mapped.append(f"{flag[6:]} '{getattr(lg, flag)}' -> tag {tag}")
    tr.run_tags = ",".join(f"{k}={v}" for k, v in tags.items()) or None
    if lg.wandb_mode == "disabled":
        tr.tracking_uri = "off"
        mapped.append("mode disabled -> tracking off")
    elif lg.wandb_mode == "offline" or (lg.wandb_dir and not tr.tracking_uri
                                        and not os.environ.get("MLFLOW_TRACKING_URI")):
        root = lg.wandb_dir or cfg.storage.work_dir
        if "://" not in root:
            root = os.path.abspath(os.path.expanduser(root))
        tr.tracking_uri = f"sqlite:///{root.rstrip('/')}/mlflow.db"
        mapped.append(f"mode {lg.wandb_mode} -> local store {tr.tracking_uri}")
    _once(logging.INFO, "W&B flags mapped onto MLflow (kubedistill tracks in MLflow, not "
          f"W&B): {'; '.join(mapped) or 'nothing to map'}")


def parse_tags(text: str | None) -> list[tuple[str, str]]:
    """``"group=a,org=b"`` -> ``[("group", "a"), ("org", "b")]``."""
    pairs = []
    for item in (text or "").split(","):
        if item.strip():
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"run_tags: '{item}' is not key=value")
            pairs.append((key.strip(), value.strip()))
    return pairs


def check(cfg: Any) -> None:
    """Refuse KDFlow flags kubedistill does not implement, naming why."""
    m, t, d, k, lg = cfg.model, cfg.train, cfg.data, cfg.kd, cfg.logging
    if m.ring_attn_size != 1:
        raise ConfigError(
            f"ring_attn_size {m.ring_attn_size}: ring attention (context parallelism) is not "
            "implemented in kubedistill; use ring_attn_size 1 and keep max_len within one "
            "device (gradient_checkpointing, use_dynamic_bsz and packing_samples help)")
    if t.device == "cpu" and (cfg.fsdp.cpu_offload or m.use_liger_kernel):
        flag = "cpu_offload" if cfg.fsdp.cpu_offload else "use_liger_kernel"
        raise ConfigError(f"{flag} needs CUDA and device is cpu (see docs/kdflow.md)")
    if t.backend != "fsdp2":
        raise ConfigError(f"backend must be fsdp2 (KDFlow's only choice), got '{t.backend}'")
    if lg.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"wandb_mode must be one of {', '.join(WANDB_MODES)}, "
                          f"got '{lg.wandb_mode}'")
    if lg.sync_swanlab:
        raise ConfigError("sync_swanlab: kubedistill logs to MLflow only (the W&B flags map "
                          "onto MLflow); drop --sync_swanlab")
    if k.multi_teacher_config:
        raise ConfigError("multi_teacher_config: multi-teacher KD is not implemented in "
                          "kubedistill (one teacher per run)")
    if d.custom_eval_fn:
        raise ConfigError("custom_eval_fn: kubedistill runs no user Python in the evaluate "
                          "stage; choose eval_task (gsm8k | rouge | none) and eval_metric")
    if t.max_ckpt_num != -1:
        raise ConfigError(f"max_ckpt_num {t.max_ckpt_num}: kubedistill keeps the two newest "
                          "complete checkpoints (a crash mid-save leaves the older one); "
                          "use max_ckpt_num -1")
    if t.resume_from:
        raise ConfigError("resume_from: kubedistill resumes from the newest complete "
                          "checkpoint under ckpt_path; set --ckpt_path and --resume True")
    if d.input_template is not None:
        if "{}" not in d.input_template:
            raise ConfigError(f"input_template must contain '{{}}' where the prompt goes, "
                              f"got {d.input_template!r}")
        if d.apply_chat_template:
            raise ConfigError("input_template applies only without a chat template (as in "
                              "KDFlow); add --apply_chat_template False or drop it")
        if "\\n" in d.input_template:
            _once(logging.WARNING, "input_template contains '\\\\n' characters, not "
                  "newlines; in bash pass $'...\\n...'")
