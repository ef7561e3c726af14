"""``use_liger_kernel``: Liger-Kernel's Triton kernels patched into the student (CUDA only).

:func:`apply_liger_kernels` patches the loaded student instance in place (RMSNorm, RoPE,
SwiGLU/GeGLU, ... as Liger defines them for the model type) before it is sharded; numerics
stay those of the model within kernel tolerance. The loss never goes through the model's
``forward`` (kubedistill computes it from the body's hidden states with its own chunked
loss), so Liger's fused linear cross-entropy has nothing to replace.

Refused with a ConfigError, naming why: on a CPU device (Triton kernels need a GPU), when
``liger-kernel`` is not installed (the ``gpu`` extra), and for a model type Liger has no
kernels for (Liger itself would only log that and do nothing).
"""

from __future__ import annotations

import logging

from torch import nn

from kubedistill.errors import ConfigError

log = logging.getLogger(__name__)


def apply_liger_kernels(model: nn.Module, device_type: str) -> None:
    if device_type != "cuda":
        raise ConfigError(f"use_liger_kernel needs CUDA: Liger's Triton kernels do not run on "
                          f"{device_type}; drop --use_liger_kernel for CPU training")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ConfigError(f"use_liger_kernel: liger-kernel is not importable ({exc}); install "
                          "kubedistill[gpu]") from exc
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"use_liger_kernel: Liger has no kernels for model type "
                          f"'{model_type}'; drop --use_liger_kernel")
    _apply_liger_kernel_to_instance(model=model)
    log.info("use_liger_kernel: Liger kernels applied to the %s student", model_type)
