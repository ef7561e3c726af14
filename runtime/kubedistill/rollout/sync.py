"""Weight sync: the FSDP2 student's full weights -> a rollout engine (or a teacher copy).

Every rank takes part in gathering the full state dict (``get_model_state_dict`` with
``full_state_dict=True, cpu_offload=True``: rank 0 ends with CPU tensors, the others with
nothing); rank 0 then pushes it to its engine in buckets of at most ``bucket_bytes`` (one
``load_weights`` call per bucket: SGLang's ``update_weights_from_tensor`` copies a bucket at
a time, so peak extra memory is one bucket, not the model; ``flush_cache`` is passed only with
the last bucket, see :mod:`kubedistill.sglang_engine`). Tensors are cast to ``dtype``
(the engine's compute dtype) before they are pushed. Tied weights appear under every name
the state dict gives them; engines copy each one (same values).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from kubedistill.sglang_engine import with_flush_flags
from kubedistill.train.fsdp import DistEnv, full_state_dict

DEFAULT_BUCKET_BYTES = 512 * 2**20


def buckets(state: dict[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
            dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``(name, tensor)`` lists of at most ``bucket_bytes`` each (a larger tensor alone),
    in state-dict order."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in state.items():
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def gather_student(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's full state dict (HF names) on rank 0, ``{}`` elsewhere; all ranks call."""
    return full_state_dict(student)


def push(state: dict[str, torch.Tensor], engine, env: DistEnv,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None) -> int:
    """Rank 0 loads ``state`` into ``engine`` bucket by bucket; returns the bytes pushed."""
    if not env.is_main or engine is None:
        return 0
    pushed = 0
    device = getattr(engine, "push_device", None)
    for bucket, last in with_flush_flags(buckets(state, bucket_bytes, dtype)):
        if device is not None:
            bucket = [(k, v.to(device, non_blocking=True)) for k, v in bucket]
        engine.load_weights(bucket, flush_cache=last)
        pushed += sum(v.numel() * v.element_size() for _, v in bucket)
    return pushed


@torch.no_grad()
def ema_update(teacher: nn.Module, student_state: dict[str, torch.Tensor], decay: float) -> None:
    """``theta_T <- decay * theta_T + (1 - decay) * theta_S`` for every floating-point tensor
    of ``teacher`` named in ``student_state`` (in the teacher's dtype, float32 maths)."""
    named = dict(teacher.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    for name, source in student_state.items():
        target = named.get(name)
        if target is None or id(target) in seen or not target.is_floating_point():
            continue
        seen.add(id(target))  # tied weights: update once
        mixed = target.float() * decay + source.to(target.device, torch.float32) * (1 - decay)
        target.copy_(mixed.to(target.dtype))
