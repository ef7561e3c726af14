"""KD losses: a registry of per-token divergences and the chunked fused-linear loss.

``LOSSES`` maps a name to ``fn(student_logits, teacher_logits, *, temperature=1.0,
**hparams) -> Tensor[N]`` (see :mod:`kubedistill.losses.divergences` for the formulas);
``register_loss(name)`` adds one, also from user code loaded through
``$KUBEDISTILL_PLUGINS`` (see :mod:`kubedistill.losses.registry`).
:func:`fused_kd_loss` turns student hidden states + lm_head + teacher states into
``(1 - r) CE + r c KD`` without materialising [N, V] logits.
"""

from kubedistill.losses.chunked import KDLoss, fused_kd_loss
from kubedistill.losses.divergences import LOSSES, register_loss
from kubedistill.losses.registry import PLUGINS_ENV, Registry, load_plugins


def get_loss(name: str):
    """The loss registered as ``name``; ConfigError naming the closest valid name."""
    return LOSSES.lookup(name)


def loss_hparams(kd_config) -> dict:
    """The loss hyper-parameters of a ``KDConfig``, passed to every loss."""
    return {"jsd_beta": kd_config.jsd_beta, "skew_lambda": kd_config.skew_lambda,
            "adaptive_alpha": kd_config.adaptive_alpha, "hrl_topk": kd_config.hrl_topk}


__all__ = ["LOSSES", "PLUGINS_ENV", "KDLoss", "Registry", "fused_kd_loss", "get_loss",
           "load_plugins", "loss_hparams", "register_loss"]
