"""SFT: the hard-label cross-entropy only; no teacher."""

from __future__ import annotations

import torch

from kubedistill.algorithms.base import Algorithm, MicroBatch
from kubedistill.algorithms.registry import register_algorithm
from kubedistill.losses import fused_kd_loss


@register_algorithm("sft")
class SFT(Algorithm):
    """loss = 1/Z sum_i CE(s_i, y_i), chunked like vanilla_kd; returns ``{"loss", "ce"}``.
    ``batch.extras["token_weights"]`` [N], if present, weights each token."""

    needs_teacher = False

    def forward(self, batch: MicroBatch, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                normalizer: float) -> dict[str, torch.Tensor]:
        out = fused_kd_loss(hidden, lm_head_weight, batch.target_ids, kd_ratio=0.0,
                            normalizer=normalizer,
                            token_weights=batch.extras.get("token_weights"),
                            chunk_size=self.config.train.chunked_loss_size)
        return {"loss": out.loss, "ce": out.ce}
