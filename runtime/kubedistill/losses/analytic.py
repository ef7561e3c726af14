"""Closed-form gradients for the hottest losses, used by the chunked path in place of autograd.

With q = softmax(s / T) and a per-token loss J(q), the chain rule through the softmax gives

    dJ/ds_j = (1/T) q_j (u_j - sum_k q_k u_k),      u = dJ/dq

    KL(p || q):    dJ/ds = (q - p) / T
    KL(q || p):    dJ/ds = q * ((log q - log p) - KL(q || p)) / T
    JSD_beta:      m = beta q + (1 - beta) p,  u = beta log(q / m)
                   =>  dJ/ds = beta/T * q * (log(q/m) - KL(q || m))
    CE(s, y):      dCE/ds = softmax(s) - onehot(y)                       (T = 1)

Each ``*_value_and_grad(s, t, temperature, **hparams)`` returns (per-token loss [n],
d loss_i / d s_i [n, V]) and reuses its buffers in place, so a chunk needs about half the
memory and passes of autograd. ``ANALYTIC`` maps the registered function objects to them; a
user loss (or a user override of a built-in name) is not in it and gets autograd. The
unchunked reference path always uses autograd, so tests comparing the two paths check
these formulas.
"""

from __future__ import annotations

import math

import torch

from kubedistill.losses import divergences as D


def kl_value_and_grad(s, t, temperature=1.0, **hparams):
    b, a = D._log_probs(s, t, temperature)
    a = a.clamp_min_(D._FLOOR)
    p = a.exp()
    value = a.sub_(b).mul_(p).sum(-1).clamp_min_(0.0)
    del a
    grad = b.exp_().sub_(p)
    return value, grad.div_(temperature) if temperature != 1.0 else grad


def rkl_value_and_grad(s, t, temperature=1.0, **hparams):
    b, a = D._log_probs(s, t, temperature)
    q = b.exp()
    diff = b.sub_(a)  # log q - log p
    del a
    value = (q * diff).sum(-1)
    grad = diff.sub_(value[:, None]).mul_(q)
    return value.clamp_min_(0.0), grad.div_(temperature) if temperature != 1.0 else grad


def jsd_value_and_grad(s, t, temperature=1.0, jsd_beta=0.5, **hparams):
    beta = float(jsd_beta)
    if beta <= 0.0:
        return rkl_value_and_grad(s, t, temperature)
    if beta >= 1.0:
        return kl_value_and_grad(s, t, temperature)
    b, a = D._log_probs(s, t, temperature)
    m = torch.logaddexp(b + math.log(beta), a + math.log1p(-beta))
    q = b.exp()
    dq = b.sub_(m)  # log q - log m
    kl_qm = (q * dq).sum(-1)
    a = a.clamp_min_(D._FLOOR)
    p = a.exp()
    kl_pm = a.sub_(m).mul_(p).sum(-1)
    del a, p, m
    value = (beta * kl_qm + (1.0 - beta) * kl_pm).clamp_min_(0.0)
    grad = dq.sub_(kl_qm[:, None]).mul_(q).mul_(beta / temperature)
    return value, grad


ANALYTIC = {D.forward_kl: kl_value_and_grad, D.reverse_kl: rkl_value_and_grad,
            D.generalized_jsd: jsd_value_and_grad}


def ce_value_and_grad(logits: torch.Tensor, targets: torch.Tensor, row_coef,
                      ignore_index: int = -100):
    """Per-token CE (0 at ``ignore_index``) and ``row_coef_i * d CE_i / d logits_i``
    (None when ``row_coef`` is the number 0: no gradient wanted), from one logsumexp."""
    valid = targets != ignore_index
    safe = targets.clamp_min(0)
    lse = logits.logsumexp(-1)
    value = (lse - logits.gather(-1, safe[:, None]).squeeze(-1)) * valid
    if not isinstance(row_coef, torch.Tensor) and row_coef == 0:
        return value, None
    grad = (logits - lse[:, None]).exp_()
    grad[torch.arange(logits.shape[0], device=logits.device), safe] -= 1.0
    coef = valid.to(grad.dtype) * row_coef
    return value, grad.mul_(coef[:, None])
