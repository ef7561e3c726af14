"""Per-token KD losses between student and teacher logits.

Every loss has the signature ``fn(student_logits, teacher_logits, *, temperature=1.0,
**hparams) -> Tensor[N]`` over logits ``[N, V]`` (any float dtype), and:

* upcasts to float32 first (float64 stays float64) and works from log-softmax, so no ``log(0)`` is ever taken;
* divides BOTH sides by the temperature ``T``:  ``p_T = softmax(t / T)``, ``p_S = softmax(s / T)``
  (written ``p`` and ``q`` below, with log-probabilities ``a = log p``, ``b = log q``);
* does NOT multiply by ``T^2``: the algorithm applies that factor (config
  ``kd_temperature_squared``, default True) so that a loss stays a plain divergence;
* ignores hyper-parameters it does not use (all of ``jsd_beta``, ``skew_lambda``,
  ``adaptive_alpha``, ``hrl_topk`` are passed to every loss);
* returns divergences clamped at 0 (rounding of nearly equal bf16 inputs can otherwise give
  tiny negative values).

Gradients flow into whichever input requires them; KD callers hand in a teacher without grad.
Teacher logits of ``-inf`` (a masked vocabulary entry) are allowed: ``0 * log 0 = 0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kubedistill.losses.registry import Registry

LOSSES: Registry = Registry("loss", "kd_loss_fn", aliases={
    "forward_kl": "kl", "fkl": "kl", "reverse_kl": "rkl", "js": "jsd", "js_div": "jsd",
    "skewed_kl": "skl", "skewed_rkl": "srkl", "adaptive_kl": "akl", "tv": "tvd"})


def register_loss(name: str, *, override: bool = False):
    """Decorator adding ``fn(student_logits, teacher_logits, *, temperature=1.0, **hparams)``."""
    return LOSSES.register(name, override=override)


_FLOOR = -1e30  # stands in for log 0 where it is multiplied by a probability that is 0


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_probs(student_logits, teacher_logits, temperature):
    s = _upcast(student_logits)
    t = _upcast(teacher_logits)
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v e^a (a - b) over the last axis, with ``a = -inf`` contributing 0."""
    a = a.clamp_min(_FLOOR)
    return (a.exp() * (a - b)).sum(-1)


def _mix(a: torch.Tensor, b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w e^a + (1 - w) e^b) for w in [0, 1]."""
    if weight_a <= 0.0:
        return b
    if weight_a >= 1.0:
        return a
    return torch.logaddexp(a + math.log(weight_a), b + math.log1p(-weight_a))


@register_loss("kl")
def forward_kl(student_logits, teacher_logits, *, temperature=1.0, **hparams):
    """Forward KL:  KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(a, b).clamp_min(0.0)


@register_loss("rkl")
def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, **hparams):
    """Reverse KL:  KL(q || p) = sum_v q_v (log q_v - log p_v)."""
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(b, a).clamp_min(0.0)


@register_loss("jsd")
def generalized_jsd(student_logits, teacher_logits, *, temperature=1.0, jsd_beta=0.5,
                    **hparams):
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), beta = ``jsd_beta``:

        m = beta * p + (1 - beta) * q
        JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)

    beta = 0.5 is the symmetric JSD (bounded by log 2). At the end points JSD_beta vanishes,
    so, as in GKD/TRL/Liger, beta = 0 gives the limit of JSD_beta / beta, KL(p || q), and
    beta = 1 the limit of JSD_beta / (1 - beta), KL(q || p). (KDFlow's ``jsd`` weights the
    mixture the other way round, m = beta q + (1 - beta) p; both agree at the default 0.5.)
    """
    beta = float(jsd_beta)
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    if beta <= 0.0:
        return _kl(a, b).clamp_min(0.0)
    if beta >= 1.0:
        return _kl(b, a).clamp_min(0.0)
    m = _mix(a, b, beta)
    return (beta * _kl(a, m) + (1.0 - beta) * _kl(b, m)).clamp_min(0.0)


@register_loss("skl")
def skewed_kl(student_logits, teacher_logits, *, temperature=1.0, skew_lambda=0.1,
              **hparams):
    """Skewed forward KL (DistiLLM, Ko et al. 2024), lambda = ``skew_lambda`` in [0, 1]:

        SKL_lambda = KL(p || lambda p + (1 - lambda) q)        (lambda = 0: forward KL)
    """
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(a, _mix(a, b, float(skew_lambda))).clamp_min(0.0)


@register_loss("srkl")
def skewed_reverse_kl(student_logits, teacher_logits, *, temperature=1.0, skew_lambda=0.1,
                      **hparams):
    """Skewed reverse KL (DistiLLM), lambda = ``skew_lambda`` in [0, 1]:

        SRKL_lambda = KL(q || lambda q + (1 - lambda) p)       (lambda = 0: reverse KL)
    """
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(b, _mix(b, a, float(skew_lambda))).clamp_min(0.0)


@register_loss("akl")
def adaptive_kl(student_logits, teacher_logits, *, temperature=1.0, adaptive_alpha=0.5,
                **hparams):
    """Adaptive KL (Wu et al. 2024, "Rethinking KL divergence in KD for LLMs"), mu = ``adaptive_alpha``.

    Sort the vocabulary by teacher probability, descending: p_(1) >= p_(2) >= ... . Token (j)
    is in the HEAD H iff the teacher mass strictly before it is below mu,
    sum_{i<j} p_(i) < mu (so the top token is always in H for mu > 0); the rest is the TAIL.
    With the gaps g_H = sum_{v in H} |p_v - q_v| and g_T = sum_{v not in H} |p_v - q_v|
    (constants: no gradient flows through them, nor through H),

        AKL = g_H / (g_H + g_T) * KL(p || q) + g_T / (g_H + g_T) * KL(q || p)

    and both weights are 1/2 when g_H + g_T = 0 (identical distributions: AKL = 0, no NaN).
    """
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    with torch.no_grad():
        p, q = a.exp(), b.exp()
        p_sorted, order = p.sort(dim=-1, descending=True)
        mass_before = p_sorted.cumsum(-1) - p_sorted
        head = mass_before < float(adaptive_alpha)
        gap = (p_sorted - q.gather(-1, order)).abs()
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(1e-30),
                             torch.full_like(total, 0.5))
    return (w_head * _kl(a, b) + (1.0 - w_head) * _kl(b, a)).clamp_min(0.0)


@register_loss("tvd")
def total_variation(student_logits, teacher_logits, *, temperature=1.0, **hparams):
    """Total variation distance:  TVD = 1/2 sum_v |p_v - q_v|  (in [0, 1])."""
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    return 0.5 * (a.exp() - b.exp()).abs().sum(-1)


@register_loss("top1_ce")
def top1_cross_entropy(student_logits, teacher_logits, *, temperature=1.0, **hparams):
    """Cross-entropy against the teacher's top-1 token:  -log q_{argmax_v p_v}.

    (KDFlow's ``top1_ce`` additionally multiplies by p_max; this one is the plain CE.)
    """
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    return -b.gather(-1, a.argmax(-1, keepdim=True)).squeeze(-1)


@register_loss("hrl")
def hierarchical_ranking(student_logits, teacher_logits, *, temperature=1.0, hrl_topk=5,
                         **hparams):
    """Hierarchical ranking loss over the teacher's top-k, k = ``hrl_topk`` (kubedistill's).

    Let K = (k_1, ..., k_k) be the teacher's k most likely tokens in descending order
    (k capped at V) and R the rest of the vocabulary. Collapse both distributions onto the
    k + 1 outcomes (k_1, ..., k_k, R):  P = (p_{k_1}, ..., p_{k_k}, p(R)), Q likewise from q.

        HRL = KL(P || Q) + 1/(k - 1) * sum_{j=1}^{k-1} max(0, log q_{k_{j+1}} - log q_{k_j})

    By the chain rule KL(P || Q) is the two-level loss "mass on the top-k vs the rest"
    (a binary KL) + p(K) * KL(p(.|K) || q(.|K)) (the shape inside the top-k). The hinge
    term is the ranking level: it is 0 iff the student orders K as the teacher does. All
    terms use log-probabilities at temperature T. HRL = 0 when log q = log p on K (which
    fixes q(R) = p(R) too); the hinge is differentiable almost everywhere. k = 1 has no
    ranking term; k >= V has no rest outcome (then HRL = KL(p || q)).
    """
    b, a = _log_probs(student_logits, teacher_logits, temperature)
    k = max(1, min(int(hrl_topk), a.shape[-1]))
    top_a, idx = a.topk(k, dim=-1)
    top_b = b.gather(-1, idx)
    if k < a.shape[-1]:
        rest_a = a.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
        rest_b = b.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
        top_a = torch.cat([top_a, rest_a], dim=-1)
        top_b_all = torch.cat([top_b, rest_b], dim=-1)
    else:
        top_b_all = top_b
    loss = _kl(top_a, top_b_all).clamp_min(0.0)
    if k > 1:
        loss = loss + F.relu(top_b[..., 1:] - top_b[..., :-1]).sum(-1) / (k - 1)
    return loss
