"""Simple cross-tokenizer KD: KD at aligned positions over the shared sub-vocabulary."""

from __future__ import annotations

import torch

from kubedistill.algorithms.base import Algorithm, MicroBatch
from kubedistill.algorithms.registry import register_algorithm
from kubedistill.algorithms.vanilla_kd import kd_scale
from kubedistill.losses import fused_kd_loss, get_loss, loss_hparams


def load_vocab_map(config):
    """The prepared data's vocabulary map (``{prepared_path}/vocab_map.safetensors``)."""
    from kubedistill import storage
    from kubedistill.crosstok.vocab import VOCAB_MAP_FILE, VocabMap
    from kubedistill.errors import ConfigError

    if not storage.exists(storage.join(config.prepared_path, VOCAB_MAP_FILE)):
        raise ConfigError(f"{config.prepared_path} has no {VOCAB_MAP_FILE}: prepare writes it "
                          "when the teacher's vocabulary differs from the student's (same "
                          "vocabulary: use vanilla_kd)")
    return VocabMap.load(config.prepared_path)


@register_algorithm("simple_ctkd")
class SimpleCTKD(Algorithm):
    """Per student loss token i (N of them), with r = ``kd_ratio``, Z = normalizer:

        loss = 1/Z [ (1 - r) sum_i CE(s_i, y_i) + r c sum_{(i, j) in A} KD_T(s_i|K, t_j|K) ]

    CE is over the student's full vocabulary. A holds the aligned pairs of the micro-batch
    (``batch.extras["ct_student_index"]`` / ``["ct_teacher_index"]``, rows of ``hidden`` and
    ``batch.teacher_hidden``; :mod:`kubedistill.crosstok.align`). ``s|K`` and ``t|K`` are the
    logits restricted to the K mapped ids of the vocabulary map (student ids on one side,
    teacher ids on the other, in pair order), so both softmaxes renormalise over the shared
    sub-vocabulary; KD is ``LOSSES[kd_loss_fn]``, c = T^2 if ``kd_temperature_squared``.
    Unaligned tokens get CE only. Returns ``{"loss", "ce", "kd", "aligned"}``: ``aligned`` is
    |A| / Z, which summed over a step is the aligned-position ratio.
    ``vocab_map`` (a :class:`~kubedistill.crosstok.vocab.VocabMap`) defaults to the one
    stored with the prepared data.
    """

    needs_teacher = True

    def __init__(self, config, teacher_head=None, student_hidden_size=None, vocab_map=None):
        super().__init__(config, teacher_head, student_hidden_size)
        self.loss_fn = get_loss(config.kd.kd_loss_fn)
        vmap = vocab_map if vocab_map is not None else (
            load_vocab_map(config) if config.kd.kd_ratio > 0 else None)
        self._map = None if vmap is None else (vmap.student_ids, vmap.teacher_ids)

    def sub_head(self, device: torch.device):
        """The teacher head restricted to the mapped teacher ids (built once by the head)."""
        return self.teacher_head.select(self._map[1]).to(device)

    def forward(self, batch: MicroBatch, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                normalizer: float) -> dict[str, torch.Tensor]:
        kd = self.config.kd
        chunk = self.config.train.chunked_loss_size
        weights = batch.extras.get("token_weights")
        ce = fused_kd_loss(hidden, lm_head_weight, batch.target_ids, kd_ratio=0.0,
                           normalizer=normalizer, token_weights=weights, chunk_size=chunk)
        zero = hidden.new_zeros((), dtype=torch.float32)
        if kd.kd_ratio <= 0:
            return {"loss": ce.loss, "ce": ce.ce, "kd": zero, "aligned": zero}
        s_idx = batch.extras.get("ct_student_index")
        t_idx = batch.extras.get("ct_teacher_index")
        if (s_idx is None or t_idx is None or batch.teacher_hidden is None
                or self.teacher_head is None or self._map is None):
            raise ValueError("simple_ctkd needs the cross-tokenizer alignment "
                             "(extras ct_student_index/ct_teacher_index), teacher_hidden, a "
                             "teacher head and the vocabulary map")
        s_ids = self._map[0].to(hidden.device)
        rows = hidden.index_select(0, s_idx)
        kd_out = fused_kd_loss(
            rows, lm_head_weight.index_select(0, s_ids),
            torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device),
            teacher_hidden=batch.teacher_hidden.index_select(0, t_idx),
            teacher_head=self.sub_head(hidden.device).logits, loss_fn=self.loss_fn,
            kd_ratio=1.0, temperature=kd.kd_temperature, kd_scale=kd_scale(kd),
            normalizer=normalizer,
            token_weights=None if weights is None else weights.index_select(0, s_idx),
            chunk_size=chunk, hparams=loss_hparams(kd))
        loss = (1.0 - kd.kd_ratio) * ce.loss + kd.kd_ratio * kd_out.loss
        aligned = torch.tensor(float(s_idx.numel()) / float(normalizer), device=hidden.device)
        return {"loss": loss, "ce": ce.ce, "kd": kd_out.kd, "aligned": aligned}
