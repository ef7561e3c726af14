"""Fused linear + CE + KD loss, computed a chunk of tokens at a time.

For student hidden states ``h`` [N, d], the student lm_head ``W`` [V, d], targets ``y`` [N],
token weights ``w`` [N] (default 1), teacher logits ``t_i`` rebuilt from the teacher hidden
states by a teacher head, and student logits ``s_i = W h_i``:

    loss = 1/Z * sum_i w_i * [ (1 - r) * CE(s_i, y_i) + r * c * KD(s_i[:V'], t_i[:V']) ]

with ``r = kd_ratio``, ``c = kd_scale`` (the algorithm passes T^2 when
``kd_temperature_squared``), ``Z = normalizer`` (the global loss-token count of the optimizer
step; default N) and ``V' = min(V, V_teacher)``: a vocabulary padded on one side is cut to
the common prefix for KD, while CE always uses the full student vocabulary. KD is any
registered loss (``LOSSES``) at temperature T; CE is at temperature 1.

:func:`fused_kd_loss` with ``chunk_size=n`` never holds logits for more than ``n`` tokens:
a custom autograd function computes, in its forward, per chunk, the logits, the loss and
the gradient ``g`` of the chunk loss w.r.t. the chunk logits, then accumulates
``dL/dh[chunk] = g W`` and ``dL/dW += g^T h[chunk]`` (in float32). ``g`` comes in closed
form for CE, ``kl``, ``rkl`` and ``jsd`` (:mod:`kubedistill.losses.analytic`) and from
autograd on the chunk for every other loss, so any registered loss works. Backward only
scales the stored gradients by the incoming gradient: no recomputation, and the lm_head
matmuls are the same three as unchunked. ``chunk_size=None`` is the unchunked reference:
full [N, V] logits and plain autograd through :func:`_terms`; tests hold the two paths to
each other (gradients are exact up to float summation order).

Dtypes: the lm_head matmul runs in the dtype of ``h``/``W`` (as the model's own lm_head
would); everything from the logits on is float32, and ``dL/dW`` is accumulated in float32
before it is cast back to ``W``'s dtype. ``W`` may be the tied input embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from kubedistill.losses.analytic import ANALYTIC, ce_value_and_grad
from kubedistill.losses.divergences import LOSSES, _upcast
from kubedistill.losses.topk import TopK


class KDLoss(NamedTuple):
    """``loss`` carries the gradient; ``ce`` and ``kd`` are detached, for logging:
    ``ce = sum_i w_i CE_i / Z`` and ``kd = sum_i w_i KD_i / Z`` (KD without the factor c)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor


@dataclass
class _Spec:
    targets: torch.Tensor
    weights: torch.Tensor | None
    teacher_hidden: torch.Tensor | None
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None
    loss_fn: Callable[..., torch.Tensor]
    ce_coef: Any  # (1 - r) / Z   (float or 0-dim tensor)
    kd_coef: Any  # r * c / Z
    inv_norm: Any  # 1 / Z
    temperature: float
    hparams: dict
    chunk_size: int | None
    teacher_topk: TopK | None = None

    def teacher_logits(self, start: int, end: int) -> torch.Tensor | TopK | None:
        if self.teacher_topk is not None:
            return self.teacher_topk.rows(start, end)
        if self.teacher_head is None:
            return None
        with torch.no_grad():
            return self.teacher_head(self.teacher_hidden[start:end])


def _is_zero(x: Any) -> bool:
    return not isinstance(x, torch.Tensor) and x == 0


def _wsum(per_token: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_token.sum() if weights is None else (per_token * weights).sum()


def _common_vocab(logits: torch.Tensor, teacher):
    """Cut student and teacher logits to ``V' = min(V, V_teacher)``; a top-k teacher
    (:class:`~kubedistill.losses.topk.TopK`) names its ids and is passed whole."""
    if isinstance(teacher, TopK):
        return logits, teacher
    v = min(logits.shape[-1], teacher.shape[-1])
    return logits[:, :v], teacher[:, :v]


def _terms(logits: torch.Tensor, teacher_logits: torch.Tensor | None, spec: _Spec,
           start: int, end: int, grad: bool):
    """(objective, ce, kd) for student logits [n, V] (float32) of tokens start..end.

    ``objective`` is this chunk's share of the loss; it has a graph to ``logits`` iff
    ``grad``. CE (KD) is computed without a graph when its coefficient is 0 (logging only).
    """
    targets = spec.targets[start:end]
    weights = None if spec.weights is None else _upcast(spec.weights[start:end])
    with torch.set_grad_enabled(grad and not _is_zero(spec.ce_coef)):
        ce = _wsum(F.cross_entropy(logits, targets, reduction="none"), weights)
    objective = spec.ce_coef * ce
    kd = torch.zeros((), dtype=torch.float32, device=logits.device)
    if teacher_logits is not None:
        student, teacher = _common_vocab(logits, teacher_logits)
        with torch.set_grad_enabled(grad and not _is_zero(spec.kd_coef)):
            per_token = spec.loss_fn(student, teacher,
                                     temperature=spec.temperature, **spec.hparams)
            kd = _wsum(_upcast(per_token), weights)
        objective = objective + spec.kd_coef * kd
    return objective, (ce * spec.inv_norm).detach(), (kd * spec.inv_norm).detach()


def _analytic_terms(logits, teacher_logits, spec: _Spec, start: int, end: int, kd_grad_fn):
    """:func:`_terms` plus the gradient w.r.t. the logits, in closed form (losses.analytic)."""
    targets = spec.targets[start:end]
    weights = None if spec.weights is None else _upcast(spec.weights[start:end])
    ce_coef = spec.ce_coef if weights is None or _is_zero(spec.ce_coef) \
        else spec.ce_coef * weights
    ce_tok, g = ce_value_and_grad(logits, targets, ce_coef)
    ce = _wsum(ce_tok, weights)
    kd = torch.zeros((), dtype=logits.dtype, device=logits.device)
    if teacher_logits is not None:
        v = min(logits.shape[-1], teacher_logits.shape[-1])
        kd_tok, kd_g = kd_grad_fn(logits[:, :v], teacher_logits[:, :v], spec.temperature,
                                  **spec.hparams)
        kd = _wsum(kd_tok, weights)
        if not _is_zero(spec.kd_coef):
            kd_g.mul_(spec.kd_coef if weights is None else (spec.kd_coef * weights)[:, None])
            if g is None and v == logits.shape[-1]:
                g = kd_g
            else:
                if g is None:
                    g = torch.zeros_like(logits)
                g[:, :v] += kd_g
        del kd_g
    objective = spec.ce_coef * ce + spec.kd_coef * kd
    return objective, ce * spec.inv_norm, kd * spec.inv_norm, g


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, spec: _Spec):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) \
            if need_w else None
        loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        ce_total, kd_total = torch.zeros_like(loss), torch.zeros_like(loss)
        n = hidden.shape[0]
        for start in range(0, n, spec.chunk_size):
            end = min(start + spec.chunk_size, n)
            h_chunk = hidden[start:end]
            teacher_logits = spec.teacher_logits(start, end)
            logits = _upcast(h_chunk @ weight.T)
            kd_grad_fn = ANALYTIC.get(spec.loss_fn)
            if not (need_h or need_w):  # evaluation: values only
                objective, ce, kd = _terms(logits, teacher_logits, spec, start, end, False)
                g = None
            elif teacher_logits is None or kd_grad_fn is not None:
                objective, ce, kd, g = _analytic_terms(logits, teacher_logits, spec, start,
                                                       end, kd_grad_fn)
            else:
                with torch.enable_grad():
                    logits.requires_grad_()
                    objective, ce, kd = _terms(logits, teacher_logits, spec, start, end, True)
                    g = torch.autograd.grad(objective, logits)[0] \
                        if objective.requires_grad else None
            loss += objective.detach()
            ce_total += ce
            kd_total += kd
            # free this chunk's graph and logits before the next chunk allocates its own
            del objective, logits, teacher_logits
            if g is None:  # both coefficients are 0: this chunk adds no gradient
                if need_h:
                    grad_h[start:end].zero_()
                continue
            if need_h:
                grad_h[start:end] = g.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(g.T.to(acc_dtype), h_chunk.to(acc_dtype))
            del g
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None


def fused_kd_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                  *, teacher_hidden: torch.Tensor | None = None,
                  teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  loss_fn: str | Callable[..., torch.Tensor] = "kl", kd_ratio: float = 0.5,
                  temperature: float = 1.0, kd_scale: float = 1.0,
                  normalizer: float | torch.Tensor | None = None,
                  token_weights: torch.Tensor | None = None, chunk_size: int | None = 1024,
                  hparams: dict | None = None, teacher_topk: TopK | None = None) -> KDLoss:
    """The loss above for ``hidden`` [N, d], ``lm_head_weight`` [V, d], ``targets`` [N].

    ``teacher_head`` maps teacher hidden states [n, d_t] to teacher logits [n, V_t] (e.g.
    ``TeacherHead.logits``); it is called per chunk under ``no_grad``. With no teacher,
    ``kd_ratio`` must be 0 (plain CE) and ``kd`` is reported as 0. ``token_weights`` [N]
    scale each token (0 drops it). ``hparams`` go to the KD loss (``jsd_beta``, ...).
    ``chunk_size=None`` builds the full logits (the unchunked reference).
    ``teacher_topk`` (a sparse teacher, [N, k] ids + log-probs) replaces ``teacher_hidden``
    + ``teacher_head``; ``loss_fn`` must then be a top-k loss
    (:func:`kubedistill.losses.topk.topk_loss`).
    """
    if teacher_topk is not None:
        if teacher_head is not None or teacher_hidden is not None:
            raise ValueError("give either teacher_topk or teacher_hidden + teacher_head")
        if teacher_topk.ids.shape[0] != hidden.shape[0]:
            raise ValueError(f"teacher_topk has {teacher_topk.ids.shape[0]} rows, hidden "
                             f"{hidden.shape[0]}: rows must line up token by token")
    elif teacher_head is None and kd_ratio != 0:
        raise ValueError("kd_ratio > 0 needs teacher_hidden and teacher_head (or teacher_topk)")
    if teacher_head is not None and teacher_hidden is None:
        raise ValueError("teacher_head given without teacher_hidden")
    if teacher_hidden is not None and teacher_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows, hidden "
                         f"{hidden.shape[0]}: rows must line up token by token")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
    if isinstance(loss_fn, str):
        loss_fn = LOSSES.lookup(loss_fn)
    z = hidden.shape[0] if normalizer is None else normalizer
    inv_norm = 1.0 / z
    if hidden.dtype != lm_head_weight.dtype:
        hidden = hidden.to(lm_head_weight.dtype)
    spec = _Spec(targets=targets, weights=token_weights, teacher_hidden=teacher_hidden,
                 teacher_head=teacher_head, loss_fn=loss_fn,
                 ce_coef=(1.0 - kd_ratio) * inv_norm, kd_coef=kd_ratio * kd_scale * inv_norm,
                 inv_norm=inv_norm, temperature=float(temperature), hparams=dict(hparams or {}),
                 chunk_size=chunk_size, teacher_topk=teacher_topk)
    if chunk_size is None:
        return _unchunked(hidden, lm_head_weight, spec)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad
                                              or lm_head_weight.requires_grad)
    if not needs_grad:
        with torch.no_grad():
            return KDLoss(*_FusedLinearKD.forward(_NoGradCtx(), hidden, lm_head_weight, spec))
    return KDLoss(*_FusedLinearKD.apply(hidden.contiguous(), lm_head_weight, spec))


def _unchunked(hidden: torch.Tensor, weight: torch.Tensor, spec: _Spec) -> KDLoss:
    n = hidden.shape[0]
    logits = _upcast(hidden @ weight.T)
    objective, ce, kd = _terms(logits, spec.teacher_logits(0, n), spec, 0, n,
                               torch.is_grad_enabled())
    return KDLoss(objective, ce, kd)


class _NoGradCtx:
    """Stands in for autograd's ctx when no gradient is wanted (evaluation)."""

    needs_input_grad = (False, False, False)

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass
