"""Dual-space KD (DSKD, Zhang et al. 2024) for same or different tokenizers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kubedistill.algorithms.base import Algorithm, MicroBatch
from kubedistill.algorithms.registry import register_algorithm
from kubedistill.algorithms.vanilla_kd import kd_scale
from kubedistill.errors import ConfigError
from kubedistill.losses import fused_kd_loss, get_loss, loss_hparams

MASKED = -1.0e4  # finite "minus infinity" for attention scores: never NaN, exp() underflows


def head_logits(head, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """``TeacherHead`` logits in ``promote(hidden.dtype, float32)`` (float64 stays float64,
    so gradients can be checked), with its scale and soft-capping. ``ids`` [R, k] selects k
    vocabulary entries per row: the result is ``[R, k]`` without building ``[R, V]``."""
    dt = torch.promote_types(hidden.dtype, torch.float32)
    if ids is None:
        out = F.linear(hidden.to(dt), head.weight.to(dt),
                       None if head.bias is None else head.bias.to(dt))
    else:
        out = torch.einsum("rd,rkd->rk", hidden.to(dt), head.weight[ids].to(dt))
        if head.bias is not None:
            out = out + head.bias[ids].to(dt)
    if head.scale != 1.0:
        out = out * head.scale
    if head.softcap is not None:
        out = torch.tanh(out / head.softcap) * head.softcap
    return out


def cma_attention(query: torch.Tensor, key: torch.Tensor, query_segment: torch.Tensor,
                  key_segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-model attention weights between two token sets split into segments (samples).

    ``query`` [N, a], ``key`` [M, a]; ``*_segment`` [N] / [M] give each row's sample (a
    negative segment marks padding). Returns ``(weights [N, M], valid [N])``:
    ``weights = softmax_j(q_i . k_j / sqrt(a) + mask_ij)`` with ``mask_ij = 0`` when both rows
    are in the same (non-padding) segment, else :data:`MASKED` (finite: a row with no valid
    key gets finite, meaningless weights and ``valid[i] = False``; never NaN).
    """
    scores = query @ key.transpose(0, 1) / math.sqrt(query.shape[-1])
    same = (query_segment[:, None] == key_segment[None, :]) & (query_segment[:, None] >= 0)
    scores = scores.masked_fill(~same, MASKED)
    return torch.softmax(scores, dim=-1), same.any(dim=-1)


@register_algorithm("dskd")
class DSKD(Algorithm):
    """Dual-space KD. Projectors ``s2t`` (d_s -> d_t) and ``t2s`` (d_t -> d_s) map hidden
    states between the two models; each space then has a KD term with one head:

    - student space: ``t^s = t2s(h_t) W_s^T`` (student head detached) is the teacher's
      distribution there; ``KD_s = KD_T(s, sg(t^s))`` and ``CE_t2s = CE(t^s, y)`` (the
      latter trains ``t2s``);
    - teacher space: ``s^t = head_t(s2t(h_s))``; ``KD_t = KD_T(s^t, t)`` with ``t`` the
      teacher's logits (restricted to each row's teacher top-``dskd_topk_vocab`` ids when > 0).

    Token pairing (``dskd_token_align``):

    - ``eta`` (exact token alignment): the aligned (student row, teacher row) pairs A of
      :mod:`kubedistill.crosstok.align` (``extras ct_student_index / ct_teacher_index``), or
      row i <-> row i when the teacher rows match the student's one to one (same tokenizer);
    - ``cma`` (cross-model attention): every student row attends to the teacher rows of its
      own sample, ``a = softmax(q(sg h_s) k(h_t)^T / sqrt(d_s))`` (:func:`cma_attention`),
      ``h_t`` in student space is ``a t2s(h_t)``; the teacher rows attend back with the
      transposed scores and get ``a' s2t(h_s)``. Student-space terms run over all student
      rows, teacher-space terms over all teacher rows.

        loss = 1/Z [ (1 - r) sum_i CE(s_i, y_i) + r c sum (KD_s + KD_t) + sum CE_t2s ]

    Returns ``{"loss", "ce", "kd", "kd_student_space", "kd_teacher_space", "ce_t2s",
    "aligned"}`` (detached parts / Z). Projectors have their own optimizer group
    (``dskd_projector_lr``, no weight decay); their initialisation is seeded by the run's
    ``seed`` so every rank starts from the same values.
    """

    needs_teacher = True

    def __init__(self, config, teacher_head=None, student_hidden_size=None):
        super().__init__(config, teacher_head, student_hidden_size)
        kd = config.kd
        self.loss_fn = get_loss(kd.kd_loss_fn)
        self.align = kd.dskd_token_align
        if teacher_head is None or student_hidden_size is None:
            raise ConfigError("dskd needs the teacher head and the student's hidden size")
        d_s, d_t = int(student_hidden_size), int(teacher_head.hidden_size)
        gen = torch.Generator().manual_seed(int(config.train.seed) + 7919)
        self.s2t = _linear(d_s, d_t, gen)
        self.t2s = _linear(d_t, d_s, gen)
        if self.align == "cma":
            self.query = _linear(d_s, d_s, gen)
            self.key = _linear(d_t, d_s, gen)

    def projector_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("teacher_head.")]

    def param_groups(self) -> list[dict]:
        return [{"params": self.projector_parameters(),
                 "lr": float(self.config.kd.dskd_projector_lr), "weight_decay": 0.0}]

    # ---- the terms -------------------------------------------------------------------------
    def _kd(self, student_logits, teacher_logits):
        kd = self.config.kd
        return self.loss_fn(student_logits, teacher_logits, temperature=kd.kd_temperature,
                            **loss_hparams(kd))

    def _teacher_space(self, s2t_hidden, t_hidden):
        """KD_t per row; with ``dskd_topk_vocab`` k > 0 over each row's teacher top-k ids,
        whose projected-student logits are computed for those ids only."""
        with torch.no_grad():
            t_logits = head_logits(self.teacher_head, t_hidden)
        k = int(self.config.kd.dskd_topk_vocab)
        if 0 < k < t_logits.shape[-1]:
            t_logits, ids = t_logits.topk(k, dim=-1)
            return self._kd(head_logits(self.teacher_head, s2t_hidden, ids), t_logits)
        return self._kd(head_logits(self.teacher_head, s2t_hidden), t_logits)

    def forward(self, batch: MicroBatch, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                normalizer: float) -> dict[str, torch.Tensor]:
        kd = self.config.kd
        weights = batch.extras.get("token_weights")
        ce = fused_kd_loss(hidden, lm_head_weight, batch.target_ids, kd_ratio=0.0,
                           normalizer=normalizer, token_weights=weights,
                           chunk_size=self.config.train.chunked_loss_size)
        zero = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        if kd.kd_ratio <= 0 and batch.teacher_hidden is None:
            return {"loss": ce.loss, "ce": ce.ce, "kd": zero, "kd_student_space": zero,
                    "kd_teacher_space": zero, "ce_t2s": zero, "aligned": zero}
        if batch.teacher_hidden is None or self.teacher_head is None:
            raise ValueError("dskd needs batch.teacher_hidden and a teacher head")
        t_hidden = batch.teacher_hidden.to(self.t2s.weight.dtype)
        w_s = lm_head_weight.detach()
        if weights is None:
            weights = torch.ones(hidden.shape[0], dtype=zero.dtype, device=hidden.device)
        if self.align == "cma":
            terms = self._cma_terms(batch, hidden, t_hidden, w_s, lm_head_weight, weights)
        else:
            terms = self._eta_terms(batch, hidden, t_hidden, w_s, lm_head_weight, weights)
        kd_s, kd_t, ce_t2s, count = terms
        c = kd_scale(kd)
        loss = ((1.0 - kd.kd_ratio) * ce.loss
                + (kd.kd_ratio * c * (kd_s + kd_t) + ce_t2s) / normalizer)
        parts = {"kd_student_space": kd_s, "kd_teacher_space": kd_t, "ce_t2s": ce_t2s}
        out = {k: (v.detach() / normalizer).to(zero.dtype) for k, v in parts.items()}
        out.update(loss=loss, ce=ce.ce, kd=out["kd_student_space"] + out["kd_teacher_space"],
                   aligned=torch.tensor(count / float(normalizer), device=hidden.device))
        return out

    def _student_space(self, s_rows, t2s_rows, y, w_s, lm_head_weight, w):
        s_logits = s_rows @ lm_head_weight.to(s_rows.dtype).T
        t2s_logits = t2s_rows @ w_s.to(t2s_rows.dtype).T
        kd_s = (self._kd(s_logits, t2s_logits.detach()) * w).sum()
        ce_t2s = (F.cross_entropy(t2s_logits.to(w.dtype), y, reduction="none") * w).sum()
        return kd_s, ce_t2s

    def _eta_terms(self, batch, hidden, t_hidden, w_s, lm_head_weight, weights):
        s_idx = batch.extras.get("ct_student_index")
        t_idx = batch.extras.get("ct_teacher_index")
        if s_idx is None or t_idx is None:
            if t_hidden.shape[0] != hidden.shape[0]:
                raise ValueError("dskd (eta) needs the cross-tokenizer alignment (extras "
                                 "ct_student_index/ct_teacher_index) when teacher and student "
                                 "rows differ")
            s_idx = t_idx = torch.arange(hidden.shape[0], device=hidden.device)
        h_s, h_t = hidden.index_select(0, s_idx), t_hidden.index_select(0, t_idx)
        w = weights.index_select(0, s_idx)
        kd_s, ce_t2s = self._student_space(h_s, self.t2s(h_t), batch.target_ids[s_idx], w_s,
                                           lm_head_weight, w)
        kd_t = (self._teacher_space(self.s2t(h_s.to(h_t.dtype)), h_t) * w).sum()
        return kd_s, kd_t, ce_t2s, float(s_idx.numel())

    def _cma_terms(self, batch, hidden, t_hidden, w_s, lm_head_weight, weights):
        n, m = hidden.shape[0], t_hidden.shape[0]
        s_seg = batch.extras.get("ct_student_sample")
        t_seg = batch.extras.get("ct_teacher_sample")
        if s_seg is None or t_seg is None:
            if m != n:
                raise ValueError("dskd (cma) needs extras ct_student_sample/ct_teacher_sample")
            s_seg = t_seg = torch.zeros(n, dtype=torch.long, device=hidden.device)
        q = self.query(hidden.detach().to(self.query.weight.dtype))
        k = self.key(t_hidden)
        att, s_valid = cma_attention(q, k, s_seg, t_seg)
        att_t, t_valid = cma_attention(k, q, t_seg, s_seg)
        w = weights * s_valid.to(weights.dtype)
        kd_s, ce_t2s = self._student_space(hidden, att @ self.t2s(t_hidden), batch.target_ids,
                                           w_s, lm_head_weight, w)
        # teacher rows weigh like the tokens of their sample (0 for zero-weight samples)
        w_t = torch.zeros(m, dtype=weights.dtype, device=hidden.device)
        if n:
            per_sample = torch.zeros(int(max(s_seg.max(), t_seg.max())) + 1,
                                     dtype=weights.dtype, device=hidden.device)
            per_sample.scatter_reduce_(0, s_seg, weights, "amax", include_self=False)
            w_t = per_sample.index_select(0, t_seg) * t_valid.to(weights.dtype)
        kd_t = (self._teacher_space(att_t @ self.s2t(hidden.to(t_hidden.dtype)), t_hidden)
                * w_t).sum()
        return kd_s, kd_t, ce_t2s, float(s_valid.sum())


def _linear(d_in: int, d_out: int, gen: torch.Generator) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        layer.weight.copy_(torch.empty(d_out, d_in).uniform_(-bound, bound, generator=gen))
        layer.bias.zero_()
    return layer
