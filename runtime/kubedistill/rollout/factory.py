"""Rollout backend choice: ``cfg.rollout`` -> one engine, or a pool of
``rollout_num_engines`` engines (:mod:`kubedistill.rollout.pool`).

``rollout_backend``: ``hf`` (transformers, any device), ``sglang`` (GPU) or ``auto`` (sglang
when CUDA is available and sglang imports, else hf). Several SGLang engines need
``rollout_num_engines * rollout_tp_size`` GPUs (engine ``j`` starts at GPU
``j * rollout_tp_size``); several hf engines are copies of the student on one device.
"""

from __future__ import annotations

import torch

from kubedistill.errors import ConfigError
from kubedistill.rollout.engine import RolloutEngine


def resolve_rollout_backend(name: str) -> str:
    from kubedistill.teacher.engine import resolve_backend

    return resolve_backend(name)


def make_rollout_engine(cfg, model_path: str, device: str, model: torch.nn.Module | None = None,
                        ) -> RolloutEngine:
    """The engine(s) ``cfg.rollout`` asks for, loaded from ``model_path`` (the student's
    initial weights; later weights arrive through ``load_weights``). ``model``: an already
    loaded transformers model that a single hf engine may use."""
    n = int(cfg.rollout.rollout_num_engines)
    if n < 1:
        raise ConfigError(f"rollout_num_engines must be >= 1 for on-policy training, got {n}")
    backend = resolve_rollout_backend(cfg.rollout.rollout_backend)
    if backend == "sglang":
        need = n * cfg.rollout.rollout_tp_size
        have = torch.cuda.device_count()
        if need > have:
            raise ConfigError(f"rollout_num_engines {n} x rollout_tp_size "
                              f"{cfg.rollout.rollout_tp_size} needs {need} GPUs, this node "
                              f"has {have}")
        from kubedistill.rollout.sglang import SGLangRolloutEngine

        engines = [SGLangRolloutEngine.from_config(cfg, model_path, index=j) for j in range(n)]
    else:
        from kubedistill.rollout.hf import HFRolloutEngine

        if model is not None and n == 1:
            return HFRolloutEngine(model)
        engines = [HFRolloutEngine.from_pretrained(
            model_path, device=device, attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code) for _ in range(n)]
    if n == 1:
        return engines[0]
    from kubedistill.rollout.pool import RolloutPool

    return RolloutPool(engines)


def check_colocated_settings(cfg, student_path: str, teacher_path: str) -> None:
    """Teacher and rollout SGLang engines in one process must agree on the process-global
    settings (:func:`kubedistill.sglang_engine.check_shared_settings`); others pass."""
    from kubedistill.teacher.engine import resolve_backend

    if resolve_rollout_backend(cfg.rollout.rollout_backend) != "sglang" or \
            resolve_backend(cfg.cache.teacher_backend) != "sglang":
        return
    from kubedistill.rollout.sglang import engine_kwargs as rollout_kwargs
    from kubedistill.sglang_engine import check_shared_settings
    from kubedistill.teacher.sglang import engine_kwargs as teacher_kwargs

    check_shared_settings([teacher_kwargs(cfg, teacher_path),
                           rollout_kwargs(cfg, student_path)])
