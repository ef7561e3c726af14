"""KD losses against a sparse teacher: its top-k token ids and log-probabilities.

The teacher signal per loss token is ``TopK(ids [N, k], logprobs [N, k])``: the teacher's k
most likely tokens ``K = (v_1, ..., v_k)`` and ``a_j = log p_{v_j}`` (at temperature 1, as
a cache or an inference server stores them). The student gives full logits ``s`` [N, V].
Both sides are collapsed onto the same small outcome space and the REGISTRY's divergence
(``LOSSES[name]``) is applied to it, so any change of a registered formula (e.g. the JSD
mixture convention) carries over here unchanged. Two variants (``kd_topk_mode``):

``tail`` (default): k + 1 outcomes ``(v_1, ..., v_k, R)`` with ``R`` = every other token:

    P = (p_{v_1}, ..., p_{v_k}, 1 - sum_j p_{v_j})
    Q = (q_{v_1}, ..., q_{v_k}, q(R)),   log q(R) = logsumexp_{v not in K} s_v - logsumexp_v s_v

    loss = D(P || Q)     (D = LOSSES[name] on the (k+1)-bucket log-probabilities)

``log q(R)`` comes from a logsumexp over the student's logits outside K (never from
``log(1 - sum q)``, which cancels catastrophically when the top-k holds nearly all mass);
``log P(R) = log(-expm1(logsumexp_j a_j))``, clamped at ``_FLOOR_LOGP`` (a tail that rounds
to 0 or below is 0). By the chain rule of KL, tail-KL = KL of the binary "in K / not in K"
split + P(K) * KL of the shapes inside K; it is a lower bound of the full KL(p || q) and
equals it when k = V (then no R bucket is added).

``renorm``: k outcomes, both sides renormalised over K:

    P = softmax(a / T)[j],   Q = softmax(s_K / T)[j]     loss = D(P || Q)

Temperature: stored log-probs are at T = 1 and the teacher's tail mass at T != 1 is not
knowable from them, so the ``tail`` variant refuses T != 1 (ValueError here; the trainer
raises a ConfigError naming ``kd_temperature`` and ``kd_topk_mode``). The ``renorm``
variant is exact at any T: softmax over K of ``a / T`` equals the full-vocabulary
``softmax(t / T)`` restricted to K and renormalised (``a = t - logsumexp t`` shifts every
entry by the same constant), and the top-k set does not change with T.

Well-defined for ``TOPK_LOSSES`` = kl, rkl, jsd, skl, srkl, tvd (divergences that are
invariant to relabelling the outcomes and meaningful on a coarsened space). ``akl``,
``hrl`` and ``top1_ce`` look at the teacher's ranking of the full vocabulary (an ``R``
bucket can out-rank the top token), so they are refused.

Ids outside the student's vocabulary (a teacher vocabulary padded further) are an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kubedistill.losses.divergences import LOSSES, _upcast

TOPK_LOSSES = ("kl", "rkl", "jsd", "skl", "srkl", "tvd")
TOPK_MODES = ("tail", "renorm")
_FLOOR_LOGP = -1.0e4  # log of a bucket with no mass (exp() is exactly 0 in fp32 and fp64)


class TopK(NamedTuple):
    """A sparse teacher signal: ``ids`` [N, k] long, ``logprobs`` [N, k] (temperature 1)."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    def rows(self, start: int, end: int) -> TopK:
        return TopK(self.ids[start:end], self.logprobs[start:end])

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, stable (Maechler 2012); x >= 0 gives -inf."""
    x = x.clamp_max(0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def tail_buckets(student_logits: torch.Tensor, teacher: TopK
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities over the k (+1 tail) buckets, float32/64."""
    s = _upcast(student_logits)
    ids = teacher.ids.long()
    if ids.numel() and int(ids.max()) >= s.shape[-1]:
        raise ValueError(f"teacher top-k id {int(ids.max())} is outside the student "
                         f"vocabulary of {s.shape[-1]}")
    a = teacher.logprobs.to(s.dtype)
    log_z = s.logsumexp(-1, keepdim=True)
    b = s.gather(-1, ids) - log_z
    if teacher.k >= s.shape[-1]:  # the whole vocabulary: no tail bucket
        return b, a
    rest = s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - log_z
    tail_a = _log1mexp(a.logsumexp(-1, keepdim=True))
    return (torch.cat([b, rest.clamp_min(_FLOOR_LOGP)], -1),
            torch.cat([a, tail_a.clamp_min(_FLOOR_LOGP)], -1))


def topk_loss(name: str, mode: str = "tail") -> Callable[..., torch.Tensor]:
    """``fn(student_logits [N, V], teacher: TopK, *, temperature=1.0, **hparams) -> [N]``:
    ``LOSSES[name]`` on the buckets of ``mode`` (see the module docstring)."""
    if name not in TOPK_LOSSES:
        raise ValueError(f"top-k teacher signal: loss '{name}' is not defined on top-k "
                         f"buckets; use one of {', '.join(TOPK_LOSSES)}")
    if mode not in TOPK_MODES:
        raise ValueError(f"top-k mode must be one of {TOPK_MODES}, got {mode!r}")
    divergence = LOSSES.lookup(name)

    def tail(student_logits, teacher: TopK, *, temperature=1.0, **hparams):
        if float(temperature) != 1.0:
            raise ValueError("the tail top-k loss is defined at temperature 1 only (the "
                             "teacher's tail mass at T != 1 is not stored); use the renorm "
                             "variant or kd_temperature 1")
        b, a = tail_buckets(student_logits, teacher)
        # log-probabilities are their own logits: the registry's log_softmax is a no-op
        return divergence(b, a, temperature=1.0, **hparams)

    def renorm(student_logits, teacher: TopK, *, temperature=1.0, **hparams):
        s = _upcast(student_logits).gather(-1, teacher.ids.long())
        return divergence(s, teacher.logprobs.to(s.dtype), temperature=temperature, **hparams)

    fn = tail if mode == "tail" else renorm
    fn.__name__ = f"topk_{mode}_{name}"
    fn.__qualname__ = fn.__name__
    return fn


def topk_of_logits(logits: torch.Tensor, k: int) -> TopK:
    """The top-k of ``log_softmax(logits)`` in float32, descending (what a cache stores)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(ids, values)
