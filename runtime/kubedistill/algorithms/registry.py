"""The algorithm registry and the factory the trainer calls."""

from __future__ import annotations

from torch import nn

from kubedistill.algorithms.base import Algorithm
from kubedistill.errors import ConfigError
from kubedistill.losses.registry import Registry

ALGORITHMS: Registry = Registry("algorithm", "kd_algorithm")


def register_algorithm(name: str, *, override: bool = False):
    """Class decorator: ``@register_algorithm("my_kd") class MyKD(Algorithm): ...``."""
    add = ALGORITHMS.register(name, override=override)

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register_algorithm('{name}') needs an Algorithm subclass, "
                            f"got {cls!r}")
        if not cls.__dict__.get("name"):
            cls.name = name
        return add(cls)

    return decorator


def build_algorithm(cfg, teacher_head: nn.Module | None = None,
                    student_hidden_size: int | None = None) -> Algorithm:
    """Instantiate ``cfg.kd.kd_algorithm`` for a ``Config``.

    Raises ConfigError naming the closest valid name for an unknown algorithm or
    ``kd_loss_fn`` (the loss is checked by the algorithms that use it, at construction).
    """
    cls = ALGORITHMS.lookup(cfg.kd.kd_algorithm)
    head_free = cfg.cache.teacher_signal == "topk"  # a top-k teacher needs no head
    if cls.needs_teacher and teacher_head is None and cfg.kd.kd_ratio > 0 and not head_free:
        raise ConfigError(f"kd_algorithm '{cfg.kd.kd_algorithm}' with kd_ratio "
                          f"{cfg.kd.kd_ratio} needs a teacher head")
    return cls(cfg, teacher_head=teacher_head, student_hidden_size=student_hidden_size)
