"""Dual-space KD (DSKD, Zhang et al. 2024), as the paper and KDFlow define it.

Notation: student head ``W_s`` [V_s, d_s] (``lm_head_weight``), teacher head ``f_t(h)`` (a
``TeacherHead``: ``h W_t^T`` with its scale / soft-capping), ``sg`` = stop-gradient.

Shared vocabulary P: the pairs (student id, teacher id) of the prepared data's vocabulary
map when the tokenizers differ, else ids ``0 .. min(V_s, V_t) - 1``; with
``dskd_topk_vocab = k > 0`` only the first k pairs (lowest student ids; KDFlow's meaning:
"the number of top vocabulary tokens used for projector initialisation", -1 = all).
``A_s = W_s[P_s]^T`` [d_s, K] and ``A_t = W_t[P_t]^T`` [d_t, K].

Projectors (logit equivalence on P, least squares; :meth:`DSKD.init_from_student`, called
once with the student head as training starts):

- ``t2s`` (trainable, d_t -> d_s, no bias) starts as ``h -> h A_t pinv(A_s)``, so
  ``t2s(h_t) A_s ~= h_t A_t``;
- ``s2t`` is the FIXED map ``M = A_s pinv(A_t)`` [d_s, d_t] of that (then frozen) student
  head: ``h_s M A_t ~= h_s A_s``. It is a buffer, saved with the algorithm state.

Token pairing (``dskd_token_align``; the same tokenizer always pairs row i with row i):

- ``eta`` (exact token alignment, and the same-tokenizer case): pairs (i, j) of student row i
  and teacher row j (``extras ct_student_index / ct_teacher_index``). Per pair, with teacher
  logits ``t_j = f_t(h_t_j)`` and ``y*_j`` = argmax t_j as a student id (pairs whose teacher
  top-1 has no student id are dropped, as in KDFlow):

      u_j = t2s(h_t_j) sg(W_s)^T                    the teacher in student space
      CE_t2s = CE(u_j, y*_j)                        the t2s CE target is the teacher's top-1
      KD_s  = [argmax u_j == y*_j] * KD_T(s_i, sg(u_j))     the token-agreement mask
      KD_t  = KD_T(f_t(h_s_i M), t_j)

- ``cma`` (cross-model attention, different tokenizers): within each sample, student row i
  (input token x_i, target y_i) attends to teacher row j (x'_j, y'_j) with
  ``a_ij = softmax_j(q_i . k_j / sqrt(2 d_t))``, ``q_i = Q [sg W_s[x_i]; sg W_s[y_i]]``
  (``Q`` trainable, 2 d_s -> 2 d_t, no bias), ``k_j = [W_t[x'_j]; W_t[y'_j]]``; the teacher
  rows attend back with the transposed scores (softmax over i), ``b_ji``. Then
  ``u_i = (sum_j a_ij t2s(h_t_j)) sg(W_s)^T``, ``CE_t2s = CE(u_i, y_i)`` (ground truth),
  ``KD_s = KD_T(s_i, sg(u_i))`` over every student row and
  ``KD_t = KD_T(f_t(sum_i b_ji h_s_i M), t_j)`` over every teacher row.

With r = ``kd_ratio``, c = T^2 if ``kd_temperature_squared`` else 1 (the default), Z the
normaliser:

    loss = 1/Z [ (1 - r) sum_i CE(s_i, y_i) + r sum (c KD_s + CE_t2s + c KD_t) ]

(KDFlow's kd_loss = KD_s + CE_t2s + KD_t, mixed with CE by kd_ratio.) Every term is a sum
over tokens divided by the GLOBAL loss-token count Z, so results do not depend on the
micro-batch split; KDFlow instead divides KD_s by the micro-batch's count of agreeing tokens
and the eta terms by its aligned-token count. ``u`` uses the student head as it trains
(detached, as the paper); KDFlow uses a copy taken at the start.

Returns ``{"loss", "ce", "kd", "kd_student_space", "kd_teacher_space", "ce_t2s",
"t2s_agree", "aligned"}`` (detached parts / Z). Projectors have their own optimizer group
(``dskd_projector_lr``, no weight decay).
"""

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


def head_logits(head, hidden: torch.Tensor) -> torch.Tensor:
    """``TeacherHead`` logits in ``promote(hidden.dtype, float32)`` (float64 stays float64,
    so gradients can be checked), with its scale and soft-capping."""
    dt = torch.promote_types(hidden.dtype, torch.float32)
    out = F.linear(hidden.to(dt), head.weight.to(dt),
                   None if head.bias is None else head.bias.to(dt))
    if head.scale != 1.0:
        out = out * head.scale
    if head.softcap is not None:
        out = torch.tanh(out / head.softcap) * head.softcap
    return out


def cma_attention(query: torch.Tensor, key: torch.Tensor, query_segment: torch.Tensor,
                  key_segment: torch.Tensor, scale: float | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-model attention weights between two token sets split into segments (samples).

    ``query`` [N, a], ``key`` [M, a]; ``*_segment`` [N] / [M] give each row's sample (a
    negative segment marks padding). Returns ``(weights [N, M], valid [N])``:
    ``weights = softmax_j(q_i . k_j / scale + mask_ij)`` (``scale`` defaults to sqrt(a)) with
    ``mask_ij = 0`` when both rows are in the same (non-padding) segment, else
    :data:`MASKED` (finite: a row with no valid key gets finite, meaningless weights and
    ``valid[i] = False``; never NaN).
    """
    scores = query @ key.transpose(0, 1) / (scale or math.sqrt(query.shape[-1]))
    same = (query_segment[:, None] == key_segment[None, :]) & (query_segment[:, None] >= 0)
    scores = scores.masked_fill(~same, MASKED)
    return torch.softmax(scores, dim=-1), same.any(dim=-1)


def shared_vocab(vocab_map, v_student: int, v_teacher: int, topk: int):
    """(student ids, teacher ids) of P (see the module docstring)."""
    if vocab_map is None:
        s_ids = t_ids = torch.arange(min(v_student, v_teacher))
    else:
        s_ids, t_ids = vocab_map.student_ids, vocab_map.teacher_ids
    if topk > 0:
        s_ids, t_ids = s_ids[:topk], t_ids[:topk]
    return s_ids.long(), t_ids.long()


def projector_init(student_head: torch.Tensor, teacher_head: torch.Tensor,
                   s_ids: torch.Tensor, t_ids: torch.Tensor):
    """``(t2s weight [d_s, d_t], s2t map M [d_s, d_t])`` from the heads, in float32 (float64
    stays float64): ``t2s.weight = (A_t pinv(A_s))^T`` and ``M = A_s pinv(A_t)``."""
    dt = torch.promote_types(student_head.dtype, torch.float32)
    a_s = student_head.detach().to(dt)[s_ids.to(student_head.device)].T
    a_t = teacher_head.detach().to(dt)[t_ids.to(teacher_head.device)].T.to(a_s.device)
    return (a_t @ torch.linalg.pinv(a_s)).T.contiguous(), a_s @ torch.linalg.pinv(a_t)


@register_algorithm("dskd")
class DSKD(Algorithm):
    """See the module docstring."""

    needs_teacher = True

    def __init__(self, config, teacher_head=None, student_hidden_size=None, vocab_map=None):
        super().__init__(config, teacher_head, student_hidden_size)
        kd = config.kd
        self.loss_fn = get_loss(kd.kd_loss_fn)
        if teacher_head is None or student_hidden_size is None:
            raise ConfigError("dskd needs the teacher head and the student's hidden size")
        if vocab_map is None:
            vocab_map = _prepared_vocab_map(config)
        self.cross_vocab = vocab_map is not None
        self.align = kd.dskd_token_align if self.cross_vocab else "eta"
        d_s, d_t = int(student_hidden_size), int(teacher_head.hidden_size)
        self.t2s = nn.Linear(d_t, d_s, bias=False)
        self.register_buffer("s2t_map", torch.zeros(d_s, d_t))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        if self.align == "cma":
            gen = torch.Generator().manual_seed(int(config.train.seed) + 7919)
            self.query = nn.Linear(2 * d_s, 2 * d_t, bias=False)
            bound = 1.0 / math.sqrt(2 * d_s)
            with torch.no_grad():
                self.query.weight.copy_(torch.empty(2 * d_t, 2 * d_s).uniform_(
                    -bound, bound, generator=gen))
        self.__dict__["vocab_map"] = vocab_map  # not state: the prepared data holds it
        # teacher id -> student id (-1: none), for the teacher's top-1 token
        t2s_ids = torch.full((teacher_head.vocab_size,), -1, dtype=torch.long)
        if vocab_map is not None:
            t2s_ids[vocab_map.teacher_ids] = vocab_map.student_ids
        else:
            t2s_ids = torch.arange(teacher_head.vocab_size)
        self.register_buffer("teacher_to_student", t2s_ids, persistent=False)

    def init_from_student(self, student_head: torch.Tensor | None) -> None:
        """Projector initialisation from the student head [V_s, d_s] (module docstring)."""
        if student_head is None:
            return
        s_ids, t_ids = shared_vocab(self.vocab_map, student_head.shape[0],
                                    self.teacher_head.vocab_size,
                                    int(self.config.kd.dskd_topk_vocab))
        t2s, s2t = projector_init(student_head, self.teacher_head.weight, s_ids, t_ids)
        with torch.no_grad():
            self.t2s.weight.copy_(t2s.to(self.t2s.weight))
            self.s2t_map.copy_(s2t.to(self.s2t_map))
            self.ready.fill_(True)

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

    def _teacher_space(self, s2t_hidden, t_hidden, w):
        """sum_rows w * KD_T(f_t(s2t_hidden), f_t(t_hidden)), chunked over rows when the head
        is a plain matrix (no bias / scale / soft-cap), else with full logits."""
        head, kd = self.teacher_head, self.config.kd
        if head.bias is None and head.scale == 1.0 and head.softcap is None:
            out = fused_kd_loss(
                s2t_hidden, head.weight.to(s2t_hidden.dtype),
                torch.zeros(s2t_hidden.shape[0], dtype=torch.long, device=w.device),
                teacher_hidden=t_hidden, teacher_head=lambda h: head_logits(head, h),
                loss_fn=self.loss_fn, kd_ratio=1.0, temperature=kd.kd_temperature,
                normalizer=1.0, token_weights=w,
                chunk_size=self.config.train.chunked_loss_size, hparams=loss_hparams(kd))
            return out.loss
        with torch.no_grad():
            t_logits = head_logits(head, t_hidden)
        return (self._kd(head_logits(head, s2t_hidden), t_logits) * w).sum()

    def _teacher_top1(self, t_hidden: torch.Tensor) -> torch.Tensor:
        chunk = self.config.train.chunked_loss_size or max(1, t_hidden.shape[0])
        with torch.no_grad():
            return torch.cat([head_logits(self.teacher_head, t_hidden[i:i + chunk]).argmax(-1)
                              for i in range(0, t_hidden.shape[0], chunk)]
                             or [t_hidden.new_zeros(0, dtype=torch.long)])

    def forward(self, batch: MicroBatch, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                normalizer: float) -> dict[str, torch.Tensor]:
        kd = self.config.kd
        weights = batch.extras.get("token_weights")
        ce = fused_kd_loss(hidden, lm_head_weight, batch.target_ids, kd_ratio=0.0,
                           normalizer=normalizer, token_weights=weights,
                           chunk_size=self.config.train.chunked_loss_size)
        zero = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        names = ("kd", "kd_student_space", "kd_teacher_space", "ce_t2s", "t2s_agree", "aligned")
        if kd.kd_ratio <= 0 and batch.teacher_hidden is None:
            return {"loss": ce.loss, "ce": ce.ce, **dict.fromkeys(names, zero)}
        if batch.teacher_hidden is None or self.teacher_head is None:
            raise ValueError("dskd needs batch.teacher_hidden and a teacher head")
        if not bool(self.ready):
            raise RuntimeError("dskd: init_from_student(student lm_head weight) was not called")
        t_hidden = batch.teacher_hidden.to(self.t2s.weight.dtype)
        if weights is None:
            weights = torch.ones(hidden.shape[0], dtype=zero.dtype, device=hidden.device)
        terms = (self._cma_terms if self.align == "cma" else self._eta_terms)(
            batch, hidden, t_hidden, lm_head_weight, weights)
        kd_s, kd_t, ce_t2s, agree, count = terms
        c = kd_scale(kd)
        loss = (1.0 - kd.kd_ratio) * ce.loss + kd.kd_ratio * (c * (kd_s + kd_t) + ce_t2s) \
            / normalizer
        parts = {"kd_student_space": kd_s, "kd_teacher_space": kd_t, "ce_t2s": ce_t2s}
        out = {k: (v.detach() / normalizer).to(zero.dtype) for k, v in parts.items()}
        out.update(loss=loss, ce=ce.ce, kd=out["kd_student_space"] + out["kd_teacher_space"],
                   t2s_agree=torch.tensor(agree / float(normalizer), device=hidden.device),
                   aligned=torch.tensor(count / float(normalizer), device=hidden.device))
        return out

    def _student_space(self, s_rows, u_hidden, y, lm_head_weight, w, agree_mask: bool):
        """(sum w KD_s, sum w CE_t2s, agreeing rows) for student rows and their t2s states."""
        s_logits = s_rows @ lm_head_weight.to(s_rows.dtype).T
        u = u_hidden @ lm_head_weight.detach().to(u_hidden.dtype).T
        agree = (u.detach().argmax(-1) == y).to(w.dtype)
        kd_s = (self._kd(s_logits, u.detach()) * (w * agree if agree_mask else w)).sum()
        ce_t2s = (F.cross_entropy(u.to(w.dtype), y, reduction="none") * w).sum()
        return kd_s, ce_t2s, float((agree * (w > 0)).sum())

    def _eta_terms(self, batch, hidden, t_hidden, lm_head_weight, weights):
        s_idx = batch.extras.get("ct_student_index")
        t_idx = batch.extras.get("ct_teacher_index")
        if s_idx is None or t_idx is None:
            if t_hidden.shape[0] != hidden.shape[0]:
                raise ValueError("dskd (eta) needs the cross-tokenizer alignment (extras "
                                 "ct_student_index/ct_teacher_index) when teacher and student "
                                 "rows differ")
            s_idx = t_idx = torch.arange(hidden.shape[0], device=hidden.device)
        h_t = t_hidden.index_select(0, t_idx)
        y_star = self.teacher_to_student.to(hidden.device)[self._teacher_top1(h_t)]
        keep = (y_star >= 0) & (y_star < lm_head_weight.shape[0])
        s_idx, h_t, y_star = s_idx[keep], h_t[keep], y_star[keep]
        h_s, w = hidden.index_select(0, s_idx), weights.index_select(0, s_idx)
        kd_s, ce_t2s, agree = self._student_space(h_s, self.t2s(h_t), y_star, lm_head_weight,
                                                  w, agree_mask=True)
        kd_t = self._teacher_space(h_s.to(h_t.dtype) @ self.s2t_map.to(h_t.dtype), h_t, w)
        return kd_s, kd_t, ce_t2s, agree, float(s_idx.numel())

    def _cma_terms(self, batch, hidden, t_hidden, lm_head_weight, weights):
        n, m = hidden.shape[0], t_hidden.shape[0]
        s_seg = batch.extras.get("ct_student_sample")
        t_seg = batch.extras.get("ct_teacher_sample")
        t_in = batch.extras.get("ct_teacher_input_ids")
        t_out = batch.extras.get("ct_teacher_target_ids")
        if s_seg is None or t_seg is None or t_in is None or t_out is None:
            raise ValueError("dskd (cma) needs extras ct_student_sample/ct_teacher_sample and "
                             "ct_teacher_input_ids/ct_teacher_target_ids")
        w_s = lm_head_weight.detach()
        x = batch.input_ids.reshape(-1).index_select(0, batch.loss_index)
        dt = self.query.weight.dtype
        q = self.query(torch.cat([w_s[x], w_s[batch.target_ids]], -1).to(dt))
        w_t = self.teacher_head.weight
        k = torch.cat([w_t[t_in], w_t[t_out]], -1).to(dt)
        scale = math.sqrt(2 * self.teacher_head.hidden_size)
        att, s_valid = cma_attention(q, k, s_seg, t_seg, scale)
        att_t, t_valid = cma_attention(k, q, t_seg, s_seg, scale)
        w = weights * s_valid.to(weights.dtype)
        kd_s, ce_t2s, agree = self._student_space(
            hidden, att @ self.t2s(t_hidden), batch.target_ids, lm_head_weight, w,
            agree_mask=False)
        # teacher rows weigh like the tokens of their sample (0 for zero-weight samples)
        w_rows = torch.zeros(m, dtype=weights.dtype, device=hidden.device)
        if n:
            per_sample = torch.zeros(int(max(s_seg.max(), t_seg.max())) + 1,
                                     dtype=weights.dtype, device=hidden.device)
            per_sample.scatter_reduce_(0, s_seg, weights, "amax", include_self=False)
            w_rows = per_sample.index_select(0, t_seg) * t_valid.to(weights.dtype)
        s2t = att_t @ (hidden.to(t_hidden.dtype) @ self.s2t_map.to(t_hidden.dtype))
        kd_t = self._teacher_space(s2t, t_hidden, w_rows)
        return kd_s, kd_t, ce_t2s, agree, float(s_valid.sum())


def _prepared_vocab_map(config):
    """The prepared data's vocabulary map, or None (same tokenizer)."""
    from kubedistill import storage
    from kubedistill.crosstok.vocab import VOCAB_MAP_FILE, VocabMap

    path = config.prepared_path
    if path and storage.exists(storage.join(path, VOCAB_MAP_FILE)):
        return VocabMap.load(path)
    return None
