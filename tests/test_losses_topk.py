"""Top-k KD losses (kubedistill.losses.topk) in float64: k = V equals the full loss, the
tail buckets equal a brute-force reference, the chunked path equals the unchunked one."""

from __future__ import annotations

import pytest
import torch

from kubedistill.losses import LOSSES, fused_kd_loss
from kubedistill.losses.topk import TOPK_LOSSES, TopK, topk_loss, topk_of_logits

HP = {"jsd_beta": 0.3, "skew_lambda": 0.2, "adaptive_alpha": 0.6, "hrl_topk": 4}
V = 23


def _pair(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    return s, t


def _teacher_topk(t, k):
    logp = torch.log_softmax(t, -1)
    values, ids = logp.topk(k, -1)
    return TopK(ids, values)


def _kl64(p, q):
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("name", TOPK_LOSSES)
def test_k_equal_v_is_the_full_vocabulary_loss(name, mode):
    s, t = _pair()
    got = topk_loss(name, mode)(s, _teacher_topk(t, V), **HP)
    full = LOSSES[name](s, t, **HP)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", TOPK_LOSSES)
def test_tail_buckets_match_a_brute_force_reference(name):
    s, t = _pair(seed=1)
    k = 5
    top = _teacher_topk(t, k)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    inside = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top.ids, True)
    bucket_p = torch.cat([p.gather(-1, top.ids), (p * ~inside).sum(-1, keepdim=True)], -1)
    bucket_q = torch.cat([q.gather(-1, top.ids), (q * ~inside).sum(-1, keepdim=True)], -1)
    expected = LOSSES[name](bucket_q.log(), bucket_p.log(), **HP)
    got = topk_loss(name, "tail")(s, top, **HP)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    if name == "kl":  # independent of the registry, and a lower bound of the full KL
        torch.testing.assert_close(got, _kl64(bucket_p, bucket_q), rtol=1e-9, atol=1e-12)
        assert bool((got <= LOSSES["kl"](s, t) + 1e-12).all())
    if name == "tvd":
        torch.testing.assert_close(got, 0.5 * (bucket_p - bucket_q).abs().sum(-1))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_renorm_is_the_tempered_teacher_restricted_to_its_top_k(temperature):
    s, t = _pair(seed=2)
    k = 6
    top = _teacher_topk(t, k)  # stored at T = 1
    p = torch.softmax(t / temperature, -1).gather(-1, top.ids)
    q = torch.softmax(s / temperature, -1).gather(-1, top.ids)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    got = topk_loss("kl", "renorm")(s, top, temperature=temperature)
    torch.testing.assert_close(got, _kl64(p, q), rtol=1e-9, atol=1e-12)


def test_tail_refuses_temperature_and_unknown_losses():
    s, t = _pair()
    with pytest.raises(ValueError, match="temperature 1 only"):
        topk_loss("kl", "tail")(s, _teacher_topk(t, 4), temperature=2.0)
    with pytest.raises(ValueError, match="not defined on top-k"):
        topk_loss("top1_ce")
    with pytest.raises(ValueError, match="mode must be one of"):
        topk_loss("kl", "sparse")
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        topk_loss("kl")(s[:, :10], _teacher_topk(t, 4 + 10))


def test_student_tail_is_stable_when_the_top_k_holds_all_mass():
    s = torch.zeros(2, V)
    s[:, :3] = 60.0  # q(R) ~ e^-60: log(1 - sum q) would round to log 0
    t = torch.zeros(2, V)
    t[:, :3] = 5.0
    top = topk_of_logits(t, 3)
    loss = topk_loss("rkl")(s.requires_grad_(), top)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    assert float(loss.detach().max()) > 0  # the student's tail is far too small: penalised


@pytest.mark.parametrize("name", ["kl", "jsd", "tvd"])
def test_chunked_topk_equals_unchunked(name):
    g = torch.Generator().manual_seed(3)
    n, d = 11, 8
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n,), generator=g)
    top = _teacher_topk(torch.randn(n, V, generator=g, dtype=torch.float64), 4)
    grads = []
    for chunk in (None, 3):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_kd_loss(h, w, targets, teacher_topk=top, loss_fn=topk_loss(name),
                            kd_ratio=0.7, chunk_size=chunk, hparams=HP)
        out.loss.backward()
        grads.append((out.loss.detach(), out.kd, h.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="rows must line up"):
        fused_kd_loss(hidden, weight, targets, teacher_topk=top.rows(0, 3),
                      loss_fn=topk_loss("kl"))
