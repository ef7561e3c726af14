"""The chunked fused-linear KD loss against the unchunked reference (full logits)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kubedistill.losses import fused_kd_loss
from kubedistill.teacher.head import TeacherHead

HP = {"jsd_beta": 0.3, "skew_lambda": 0.3, "adaptive_alpha": 0.3, "hrl_topk": 4}


def make(n=37, d=16, v=101, dt=24, vt=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    ht = torch.randn(n, dt, generator=g)
    head = TeacherHead(torch.randn(vt or v, dt, generator=g) / dt**0.5, softcap=30.0)
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, ht, head, y


def run(h, w, ht, head, y, **kw):
    h.grad = w.grad = None
    out = fused_kd_loss(h, w, y, teacher_hidden=ht, teacher_head=head.logits, hparams=HP, **kw)
    out.loss.backward()
    return out, h.grad.clone(), w.grad.clone()


def assert_same(a, b, rtol=1e-5, atol=1e-7):
    (out_a, gh_a, gw_a), (out_b, gh_b, gw_b) = a, b
    for x, y in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    torch.testing.assert_close(gh_a, gh_b, rtol=rtol, atol=atol)
    torch.testing.assert_close(gw_a, gw_b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [7, 100])
@pytest.mark.parametrize("loss", ["kl", "rkl", "jsd", "akl", "hrl", "srkl"])
def test_chunked_equals_unchunked(loss, chunk, kd_ratio):
    # kl/rkl/jsd take the closed-form gradients of losses.analytic, the others autograd on
    # the chunk; the unchunked reference is always plain autograd
    inputs = make()
    weights = torch.rand(37, generator=torch.Generator().manual_seed(1))
    weights[::5] = 0.0
    kw = dict(loss_fn=loss, kd_ratio=kd_ratio, temperature=2.0, kd_scale=4.0, normalizer=53.0,
              token_weights=weights)
    ref = run(*inputs, chunk_size=None, **kw)
    got = run(*inputs, chunk_size=chunk, **kw)
    assert_same(got, ref)
    out = got[0]
    expected = (1 - kd_ratio) * out.ce + kd_ratio * 4.0 * out.kd
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert not out.ce.requires_grad and not out.kd.requires_grad


@pytest.mark.parametrize("loss", ["kl", "tvd"])
def test_ignore_index_targets_match_unchunked(loss):
    h, w, ht, head, y = make()
    y[::4] = -100
    ref = run(h, w, ht, head, y, chunk_size=None, loss_fn=loss)
    assert_same(run(h, w, ht, head, y, chunk_size=6, loss_fn=loss), ref)


@pytest.mark.parametrize("vt", [90, 120])
def test_vocab_mismatch_uses_the_common_prefix_for_kd(vt):
    inputs = make(vt=vt)
    ref = run(*inputs, chunk_size=None, loss_fn="kl")
    got = run(*inputs, chunk_size=8, loss_fn="kl")
    assert_same(got, ref)
    h, w, ht, head, _ = inputs
    v = min(w.shape[0], vt)
    s = (h @ w.T)[:, :v]
    t = head.logits(ht)[:, :v]
    kd = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                    reduction="sum") / h.shape[0]
    torch.testing.assert_close(got[0].kd, kd.detach(), rtol=1e-5, atol=1e-6)


def test_matches_a_hand_written_loss_with_weights_and_normalizer():
    h, w, ht, head, y = make(n=20)
    weights = torch.rand(20)
    weights[3] = 0.0
    got = run(h, w, ht, head, y, chunk_size=6, loss_fn="rkl", kd_ratio=0.3, temperature=1.5,
              kd_scale=2.25, normalizer=31.0, token_weights=weights)
    h.grad = w.grad = None
    s = h @ w.T
    t = head.logits(ht)
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    ls, lt = (s / 1.5).log_softmax(-1), (t / 1.5).log_softmax(-1)
    rkl = (ls.exp() * (ls - lt)).sum(-1)
    loss = (weights * (0.7 * ce + 0.3 * 2.25 * rkl)).sum() / 31.0
    loss.backward()
    torch.testing.assert_close(got[0].loss.detach(), loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], w.grad, rtol=1e-5, atol=1e-7)


def test_backward_scales_by_the_incoming_gradient():
    h, w, ht, head, y = make()
    out = fused_kd_loss(h, w, y, teacher_hidden=ht, teacher_head=head.logits, chunk_size=10)
    (3.0 * out.loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    _, gh1, gw1 = run(h, w, ht, head, y, chunk_size=10)
    torch.testing.assert_close(gh, 3 * gh1)
    torch.testing.assert_close(gw, 3 * gw1)


def test_no_grad_and_frozen_head():
    h, w, ht, head, y = make()
    ref = fused_kd_loss(h, w, y, teacher_hidden=ht, teacher_head=head.logits, chunk_size=None)
    with torch.no_grad():
        out = fused_kd_loss(h, w, y, teacher_hidden=ht, teacher_head=head.logits, chunk_size=9)
    torch.testing.assert_close(out.loss, ref.loss.detach())
    # a frozen lm_head (e.g. LoRA): only dL/dh
    w_frozen = w.detach()
    h.grad = None
    fused_kd_loss(h, w_frozen, y, teacher_hidden=ht, teacher_head=head.logits,
                  chunk_size=9).loss.backward()
    gh = h.grad.clone()
    h.grad = None
    fused_kd_loss(h, w_frozen, y, teacher_hidden=ht, teacher_head=head.logits,
                  chunk_size=None).loss.backward()
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-7)


def test_tied_embedding_gets_both_gradients():
    g = torch.Generator().manual_seed(4)
    emb = torch.nn.Embedding(50, 12)
    proj = torch.randn(12, 12, generator=g)
    ids = torch.randint(0, 50, (30,), generator=g)
    ht = torch.randn(30, 8, generator=g)
    head = TeacherHead(torch.randn(50, 8, generator=g))
    grads = []
    for chunk in (None, 7):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids) @ proj)  # input embedding path ...
        out = fused_kd_loss(hidden, emb.weight, ids.roll(-1), teacher_hidden=ht,  # ... + head
                            teacher_head=head.logits, chunk_size=chunk)
        out.loss.backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_bf16_inputs_keep_dtypes_and_track_fp32():
    h32, w32, ht, head, y = make(seed=5)
    ref = run(h32, w32, ht, head, y, chunk_size=None, loss_fn="jsd")
    h = h32.detach().bfloat16().requires_grad_()
    w = w32.detach().bfloat16().requires_grad_()
    got = run(h, w, ht, head, y, chunk_size=8, loss_fn="jsd")
    bf16_ref = run(h, w, ht, head, y, chunk_size=None, loss_fn="jsd")
    assert got[0].loss.dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].loss, ref[0].loss, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got[1].float(), ref[1], rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(got[2].float(), ref[2], rtol=5e-2, atol=2e-3)
    # and the chunked bf16 path agrees with the unchunked bf16 path
    torch.testing.assert_close(got[0].loss, bf16_ref[0].loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1].float(), bf16_ref[1].float(), rtol=2e-2, atol=1e-3)


def test_ce_only_without_teacher_and_errors():
    h, w, _, _, y = make()
    a = fused_kd_loss(h, w, y, kd_ratio=0.0, chunk_size=5)
    b = fused_kd_loss(h, w, y, kd_ratio=0.0, chunk_size=None)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.loss, torch.nn.functional.cross_entropy(h @ w.T, y))
    assert float(a.kd) == 0.0
    with pytest.raises(ValueError, match="teacher"):
        fused_kd_loss(h, w, y, kd_ratio=0.5)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("loss", ["kl", "akl", "hrl"])
def test_chunked_path_never_builds_n_by_v_tensors(loss):
    d, v, chunk = 4, 200, 64
    largest = {}
    for n, chunk_size in ((256, chunk), (1024, chunk), (256, None)):
        h, w, ht, head, y = make(n=n, d=d, v=v, dt=d)
        with LargestTensor() as probe:
            out = fused_kd_loss(h, w, y, teacher_hidden=ht, teacher_head=head.logits,
                                loss_fn=loss, chunk_size=chunk_size, hparams=HP)
            out.loss.backward()
        largest[(n, chunk_size)] = probe.largest
    assert largest[(256, None)] >= 256 * v  # the probe sees the full logits when they exist
    assert largest[(256, chunk)] <= chunk * v < 256 * v
    assert largest[(1024, chunk)] == largest[(256, chunk)]  # bounded as N grows
