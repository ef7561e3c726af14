"""AdamW with decoupled weight decay, and the learning-rate schedules.

Parameter groups: weight decay on matrices, none on norms, biases and other 1-D parameters;
an algorithm's own groups (:meth:`Algorithm.param_groups`, e.g. projectors with their own
lr) are added as given. Call after sharding: FSDP2 swaps parameters for DTensors.

Schedules (step ``s`` = optimizer steps done, ``w`` = ceil(lr_warmup_ratio * total)),
as a factor of each group's base lr, ``m = min_lr / learning_rate``:

- ``cosine_with_min_lr``: ``s / w`` while ``s < w``, then
  ``m + (1 - m) * 0.5 * (1 + cos(pi * (s - w) / (total - w)))``
- ``cosine``: the same with ``m = 0``; ``linear``: ``s / w``, then ``(total - s) / (total - w)``
- ``constant``: 1; ``constant_with_warmup``: ``s / w``, then 1
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from kubedistill.errors import ConfigError

SCHEDULES = ("cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup")


def build_optimizer(module: nn.Module, extra_groups: list[dict], *, lr: float,
                    weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    taken = {id(p) for g in extra_groups for p in g["params"]}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups += [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in extra_groups]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    if kind in ("constant",):
        return 1.0
    if warmup > 0 and step < warmup:
        return step / warmup
    if kind == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    floor = min_ratio if kind == "cosine_with_min_lr" else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int,
                    warmup_ratio: float, lr: float, min_lr: float) -> LambdaLR:
    if kind not in SCHEDULES:
        raise ConfigError(f"lr_scheduler must be one of {', '.join(SCHEDULES)}, got '{kind}'")
    warmup = math.ceil(warmup_ratio * total_steps)
    fn = partial(lr_factor, total=total_steps, warmup=warmup, kind=kind,
                 min_ratio=min_lr / lr if lr > 0 else 0.0)
    return LambdaLR(optimizer, fn)
