"""Vanilla KD: a mix of the hard-label CE and a KD divergence to the teacher."""

from __future__ import annotations

import torch

from kubedistill.algorithms.base import Algorithm, MicroBatch
from kubedistill.algorithms.registry import register_algorithm
from kubedistill.algorithms.signal import train_signal
from kubedistill.losses import fused_kd_loss, loss_hparams


def kd_scale(kd_config) -> float:
    """T^2 when ``kd_temperature_squared`` (default off, as KDFlow; Hinton et al.: keeps KD
    gradients at the scale of CE's as T grows), else 1."""
    t = float(kd_config.kd_temperature)
    return t * t if kd_config.kd_temperature_squared else 1.0


@register_algorithm("vanilla_kd")
class VanillaKD(Algorithm):
    """Per loss token i, with r = ``kd_ratio``, T = ``kd_temperature``, Z = normalizer:

        loss = 1/Z sum_i [ (1 - r) CE(s_i, y_i) + r c KD_T(s_i, t_i) ]

    KD is ``LOSSES[kd_loss_fn]`` with the loss hyper-parameters of the config, c = T^2 if
    ``kd_temperature_squared`` else 1, teacher logits t_i = teacher_head(teacher_hidden_i).
    Returns ``{"loss", "ce", "kd"}``; ``ce``/``kd`` are detached sums / Z, ``kd`` without c.
    Computed ``chunked_loss_size`` tokens at a time (None: full logits).
    ``batch.extras["token_weights"]`` [N], if present, weights each token. With
    ``teacher_signal: topk`` the teacher is the cached top-k and KD the top-k loss
    (:mod:`kubedistill.algorithms.signal`, :mod:`kubedistill.losses.topk`).
    """

    needs_teacher = True

    def __init__(self, config, teacher_head=None, student_hidden_size=None):
        super().__init__(config, teacher_head, student_hidden_size)
        self.signal = train_signal(config)  # hidden states or top-k
        self.loss_fn = self.signal.loss(config.kd.kd_loss_fn)

    def forward(self, batch: MicroBatch, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                normalizer: float) -> dict[str, torch.Tensor]:
        kd = self.config.kd
        use_teacher = kd.kd_ratio > 0 or self.signal.available(batch, self.teacher_head)
        teacher = self.signal.inputs(batch, self.teacher_head) if use_teacher else {}
        out = fused_kd_loss(
            hidden, lm_head_weight, batch.target_ids, **teacher,
            loss_fn=self.loss_fn, kd_ratio=kd.kd_ratio, temperature=kd.kd_temperature,
            kd_scale=kd_scale(kd), normalizer=normalizer,
            token_weights=batch.extras.get("token_weights"),
            chunk_size=self.config.train.chunked_loss_size, hparams=loss_hparams(kd))
        return {"loss": out.loss, "ce": out.ce, "kd": out.kd}
