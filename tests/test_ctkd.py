"""Cross-tokenizer algorithms: simple_ctkd and dskd (projectors, CMA, checkpoints), and the
trainer's alignment join."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kubedistill.algorithms import MicroBatch, build_algorithm
from kubedistill.algorithms.dskd import DSKD, MASKED, cma_attention
from kubedistill.algorithms.simple_ctkd import SimpleCTKD
from kubedistill.config import Config
from kubedistill.crosstok.vocab import VocabMap
from kubedistill.losses import LOSSES
from kubedistill.teacher.head import TeacherHead
from kubedistill.train.data import BatchBuilder, PreparedSplit


def config(**kv):
    cfg = Config()
    for key, value in kv.items():
        cfg.set(key, value)
    return cfg


def inputs(n=12, m=10, d=8, dt=6, v=40, vt=50, k=25, pairs=7, seed=0, dtype=torch.float32):
    """Two samples: student rows 0..6 | 7..11, teacher rows 0..5 | 6..9; ``pairs`` aligned."""
    g = torch.Generator().manual_seed(seed)
    s_idx = torch.tensor([0, 2, 3, 6, 7, 9, 11])[:pairs]
    t_idx = torch.tensor([0, 1, 3, 5, 6, 8, 9])[:pairs]
    s_seg = torch.tensor([0] * 7 + [1] * 5)
    t_seg = torch.tensor([0] * 6 + [1] * 4)
    batch = MicroBatch(input_ids=torch.zeros(1, n + 1, dtype=torch.long),
                       position_ids=torch.arange(n + 1)[None], attention_mask=None,
                       loss_index=torch.arange(n),
                       target_ids=torch.randint(0, v, (n,), generator=g),
                       teacher_hidden=torch.randn(m, dt, generator=g, dtype=dtype),
                       extras={"ct_student_index": s_idx, "ct_teacher_index": t_idx,
                               "ct_student_sample": s_seg, "ct_teacher_sample": t_seg})
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    head = TeacherHead(torch.randn(vt, dt, generator=g, dtype=dtype))
    vmap = VocabMap(torch.sort(torch.randperm(v, generator=g)[:k]).values,
                    torch.randperm(vt, generator=g)[:k])
    return batch, hidden, weight, head, vmap


# ---- simple_ctkd ----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 3])
def test_simple_ctkd_is_the_documented_mix(chunk):
    batch, hidden, weight, head, vmap = inputs()
    cfg = config(kd_algorithm="simple_ctkd", kd_ratio=0.3, kd_temperature=2.0,
                 kd_loss_fn="kl", chunked_loss_size=chunk)
    algo = SimpleCTKD(cfg, teacher_head=head, student_hidden_size=8, vocab_map=vmap)
    z = 20.0
    out = algo(batch, hidden, weight, normalizer=z)
    s = hidden @ weight.T
    ce = F.cross_entropy(s, batch.target_ids, reduction="sum") / z
    si, ti = batch.extras["ct_student_index"], batch.extras["ct_teacher_index"]
    s_sub = s[si][:, vmap.student_ids]
    t_sub = head.logits(batch.teacher_hidden[ti])[:, vmap.teacher_ids]
    kd = LOSSES["kl"](s_sub, t_sub, temperature=2.0).sum() / z
    # no T^2 factor by default (KDFlow)
    torch.testing.assert_close(out["loss"], 0.7 * ce + 0.3 * kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ce"], ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kd"], kd.detach(), rtol=1e-5, atol=1e-6)
    assert float(out["aligned"]) == pytest.approx(7 / z)
    out["loss"].backward()
    # unaligned rows get CE gradients only; unmapped vocab rows none from KD
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_simple_ctkd_restricted_softmax_renormalises():
    """KD over the shared ids ignores the logits of unmapped ids on both sides."""
    batch, hidden, weight, head, vmap = inputs()
    cfg = config(kd_algorithm="simple_ctkd", kd_ratio=1.0, chunked_loss_size=None)
    algo = SimpleCTKD(cfg, teacher_head=head, student_hidden_size=8, vocab_map=vmap)
    base = algo(batch, hidden, weight, normalizer=12)["kd"]
    unmapped = torch.ones(weight.shape[0], dtype=torch.bool)
    unmapped[vmap.student_ids] = False
    w2 = weight.detach().clone()
    w2[unmapped] = torch.randn_like(w2[unmapped]) * 10
    t_unmapped = torch.ones(head.vocab_size, dtype=torch.bool)
    t_unmapped[vmap.teacher_ids] = False
    hw = head.weight.clone()
    hw[t_unmapped] *= 7
    algo2 = SimpleCTKD(cfg, teacher_head=TeacherHead(hw), student_hidden_size=8, vocab_map=vmap)
    torch.testing.assert_close(algo2(batch, hidden, w2, normalizer=12)["kd"], base)


def test_simple_ctkd_without_alignment_is_an_error():
    batch, hidden, weight, head, vmap = inputs()
    batch.extras.clear()
    algo = SimpleCTKD(config(kd_ratio=0.5), teacher_head=head, student_hidden_size=8,
                      vocab_map=vmap)
    with pytest.raises(ValueError, match="alignment"):
        algo(batch, hidden, weight, normalizer=12)


def test_simple_ctkd_loads_the_prepared_vocab_map(tmp_path):
    batch, hidden, weight, head, vmap = inputs()
    vmap.save(str(tmp_path))
    cfg = config(kd_algorithm="simple_ctkd", kd_ratio=0.5, prepared_path=str(tmp_path))
    algo = build_algorithm(cfg, head, 8)
    assert torch.equal(algo._map[0], vmap.student_ids)
    assert algo.state_dict() == {}  # no parameters; the frozen teacher head is not state


def test_simple_ctkd_without_a_vocab_map_names_the_fix(tmp_path):
    from kubedistill.errors import ConfigError

    *_, head, _ = inputs()
    cfg = config(kd_algorithm="simple_ctkd", kd_ratio=0.5, prepared_path=str(tmp_path))
    with pytest.raises(ConfigError, match="vanilla_kd"):
        build_algorithm(cfg, head, 8)


# ---- dskd ---------------------------------------------------------------------------------
def dskd(align="eta", dtype=torch.float64, seed=3, vocab="map", perturb=0.0, **kv):
    """A DSKD on :func:`inputs` (``vocab``: "map" = different tokenizers, "same" = one)."""
    kv.setdefault("kd_ratio", 0.5)
    cfg = config(kd_algorithm="dskd", dskd_token_align=align, seed=seed,
                 chunked_loss_size=None, **kv)
    batch, hidden, weight, head, vmap = inputs(dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    batch.extras["ct_teacher_input_ids"] = torch.randint(0, head.vocab_size, (10,), generator=g)
    batch.extras["ct_teacher_target_ids"] = torch.randint(0, head.vocab_size, (10,), generator=g)
    batch.input_ids = torch.randint(0, weight.shape[0], (1, 13), generator=g)
    algo = DSKD(cfg, teacher_head=head, student_hidden_size=hidden.shape[1],
                vocab_map=vmap if vocab == "map" else None).to(dtype)
    algo.init_from_student(weight.detach())
    if perturb:
        with torch.no_grad():
            algo.t2s.weight.add_(perturb * torch.randn(algo.t2s.weight.shape, generator=g,
                                                       dtype=dtype))
    return algo, batch, hidden, weight, head, vmap


def _np(t):
    return t.detach().to(torch.float64).numpy()


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(student, teacher, temperature):
    """KL(p_teacher || q_student) per row at temperature T, float64 numpy."""
    a, b = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
    return (np.exp(a) * (a - b)).sum(-1)


def _ce(logits, y):
    return -_log_softmax(logits)[np.arange(len(y)), y]


def test_dskd_projector_init_is_the_least_squares_map_between_the_heads():
    """t2s / s2t start as the least-squares maps of the two heads over the shared ids
    (independent: numpy lstsq in float64); with dskd_topk_vocab k <= the hidden sizes the
    first k shared logits are reproduced exactly (logit equivalence)."""
    algo, batch, hidden, weight, head, vmap = dskd("eta")
    a_s, a_t = _np(weight)[vmap.student_ids].T, _np(head.weight)[vmap.teacher_ids].T
    x = np.linalg.lstsq(a_s.T, a_t.T, rcond=None)[0]  # A_s^T X ~ A_t^T
    np.testing.assert_allclose(_np(algo.t2s.weight), x, rtol=1e-4, atol=1e-5)
    m = np.linalg.lstsq(a_t.T, a_s.T, rcond=None)[0]  # A_t^T Y ~ A_s^T: M = Y^T
    np.testing.assert_allclose(_np(algo.s2t_map), m.T, rtol=1e-4, atol=1e-5)
    assert not any(n.startswith("s2t") for n, _ in algo.named_parameters())  # fixed map
    k = 5  # < d_s = 8 and < d_t = 6: exact
    small, *_ = dskd("eta", dskd_topk_vocab=k)
    h_t = batch.teacher_hidden
    s_ids, t_ids = vmap.student_ids[:k], vmap.teacher_ids[:k]
    torch.testing.assert_close(small.t2s(h_t) @ weight.detach()[s_ids].T,
                               h_t @ head.weight[t_ids].T)
    h_s = hidden.detach()
    torch.testing.assert_close(h_s @ small.s2t_map @ head.weight[t_ids].T,
                               h_s @ weight.detach()[s_ids].T)


def _eta_reference(algo, batch, hidden, weight, head, vmap, z, r, temperature, squared):
    """DSKD (eta) written out pair by pair in float64 from the formulas of the paper/KDFlow."""
    h_s, w_s, w_t = _np(hidden), _np(weight), _np(head.weight)
    h_t, t2s, m = _np(batch.teacher_hidden), _np(algo.t2s.weight), _np(algo.s2t_map)
    to_student = {int(t): int(s) for s, t in zip(vmap.student_ids, vmap.teacher_ids,
                                                 strict=True)}
    c = temperature ** 2 if squared else 1.0
    s_all = h_s @ w_s.T
    ce = _ce(s_all, batch.target_ids.numpy()).sum()
    kd_s = ce_t2s = kd_t = 0.0
    agree = used = 0
    for i, j in zip(batch.extras["ct_student_index"].tolist(),
                    batch.extras["ct_teacher_index"].tolist(), strict=True):
        t = h_t[j] @ w_t.T
        y_star = to_student.get(int(t.argmax()))
        if y_star is None:
            continue
        used += 1
        u = (h_t[j] @ t2s.T) @ w_s.T
        ce_t2s += _ce(u[None], np.array([y_star]))[0]
        if u.argmax() == y_star:
            agree += 1
            kd_s += _kl(s_all[i][None], u[None], temperature)[0]
        kd_t += _kl(((h_s[i] @ m) @ w_t.T)[None], t[None], temperature)[0]
    loss = (1 - r) * ce / z + r * (c * (kd_s + kd_t) + ce_t2s) / z
    return loss, agree, used


@pytest.mark.parametrize("temperature, squared", [(1.0, False), (2.0, True)])
def test_dskd_eta_matches_an_independent_float64_reference(temperature, squared):
    algo, batch, hidden, weight, head, vmap = dskd(
        "eta", kd_ratio=0.3, kd_temperature=temperature, kd_temperature_squared=squared)
    z = 20.0
    out = algo(batch, hidden, weight, normalizer=z)
    loss, agree, used = _eta_reference(algo, batch, hidden, weight, head, vmap, z, 0.3,
                                       temperature, squared)
    assert 0 < agree < used < 7  # the setup exercises the mask and the unmapped top-1
    np.testing.assert_allclose(float(out["loss"].detach()), loss, rtol=1e-9)
    assert float(out["aligned"]) == pytest.approx(used / z)
    assert float(out["t2s_agree"]) == pytest.approx(agree / z)
    torch.testing.assert_close(out["kd"], out["kd_student_space"] + out["kd_teacher_space"])


def test_dskd_same_tokenizer_pairs_rows_one_to_one():
    algo, batch, hidden, weight, head, _ = dskd("cma", vocab="same", dtype=torch.float32)
    assert algo.align == "eta"  # KDFlow: one tokenizer -> row-by-row DSKD whatever the align
    batch.extras.clear()
    batch.teacher_hidden = batch.teacher_hidden.new_zeros(12, 6).normal_()
    out = algo(batch, hidden, weight, normalizer=12.0)
    t_top = (batch.teacher_hidden @ head.weight.T).argmax(-1)
    assert float(out["aligned"]) == pytest.approx(float((t_top < 40).sum()) / 12)


def _cma_reference(algo, batch, hidden, weight, head, z, r):
    """DSKD (cma) in float64 numpy, one sample at a time."""
    h_s, w_s, w_t = _np(hidden), _np(weight), _np(head.weight)
    h_t, t2s, m, q_w = (_np(batch.teacher_hidden), _np(algo.t2s.weight), _np(algo.s2t_map),
                        _np(algo.query.weight))
    ex = batch.extras
    x = batch.input_ids.reshape(-1)[batch.loss_index].numpy()
    y = batch.target_ids.numpy()
    s_all = h_s @ w_s.T
    total = (1 - r) * _ce(s_all, y).sum() / z
    for b in range(2):
        si = np.nonzero(ex["ct_student_sample"].numpy() == b)[0]
        ti = np.nonzero(ex["ct_teacher_sample"].numpy() == b)[0]
        q = np.concatenate([w_s[x[si]], w_s[y[si]]], -1) @ q_w.T
        k = np.concatenate([w_t[ex["ct_teacher_input_ids"].numpy()[ti]],
                            w_t[ex["ct_teacher_target_ids"].numpy()[ti]]], -1)
        scores = q @ k.T / np.sqrt(2 * w_t.shape[1])
        a = np.exp(_log_softmax(scores))
        a_back = np.exp(_log_softmax(scores.T))
        u = (a @ (h_t[ti] @ t2s.T)) @ w_s.T
        kd_s = _kl(s_all[si], u, 1.0).sum()
        ce_t2s = _ce(u, y[si]).sum()
        kd_t = _kl((a_back @ (h_s[si] @ m)) @ w_t.T, h_t[ti] @ w_t.T, 1.0).sum()
        total += r * (kd_s + ce_t2s + kd_t) / z
    return total


def test_dskd_cma_matches_an_independent_float64_reference():
    algo, batch, hidden, weight, head, _ = dskd("cma", kd_ratio=0.4)
    out = algo(batch, hidden, weight, normalizer=15.0)
    np.testing.assert_allclose(float(out["loss"]),
                               _cma_reference(algo, batch, hidden, weight, head, 15.0, 0.4),
                               rtol=1e-9)


def test_dskd_projector_gradients():
    """gradcheck (float64) of the loss in the t2s projector. KD_s has the stop-gradient
    target sg(u), which a finite difference does not see, so the setup has no agreeing pair
    (KD_s = 0; checked): t2s then learns through CE_t2s only, and the s2t map is fixed."""
    algo, batch, hidden, weight, head, vmap = dskd("eta", kd_ratio=0.5, perturb=0.3)
    _, agree, used = _eta_reference(algo, batch, hidden, weight, head, vmap, 20.0, 0.5, 1.0,
                                    False)
    assert agree == 0 < used
    state = {n: p.detach() for n, p in algo.named_parameters()}
    assert sorted(state) == ["t2s.weight"]
    param = state["t2s.weight"].clone().requires_grad_(True)
    buffers = dict(algo.named_buffers())
    hidden, weight = hidden.detach(), weight.detach()

    def loss(p):
        full = dict(buffers, **{"t2s.weight": p})
        return torch.func.functional_call(algo, full, (batch, hidden, weight, 20.0))["loss"]

    assert torch.autograd.gradcheck(loss, (param,), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.grad(loss(param), param)[0].abs().sum() > 0


def test_dskd_without_student_init_is_an_error():
    batch, hidden, weight, head, vmap = inputs()
    algo = DSKD(config(kd_algorithm="dskd"), teacher_head=head, student_hidden_size=8,
                vocab_map=vmap)
    with pytest.raises(RuntimeError, match="init_from_student"):
        algo(batch, hidden, weight, normalizer=12.0)


def test_cma_masking_is_finite_with_padding():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, generator=g, requires_grad=True)
    k = torch.randn(5, 4, generator=g, requires_grad=True)
    q_seg = torch.tensor([0, 0, 1, 2, -1, -1])  # sample 2 has no keys; -1: padding
    k_seg = torch.tensor([0, 1, 1, -1, -1])
    w, valid = cma_attention(q, k, q_seg, k_seg)
    assert torch.isfinite(w).all() and valid.tolist() == [True, True, True, False, False, False]
    assert torch.allclose(w.sum(-1), torch.ones(6))
    assert w[0, 1:].abs().max() < 1e-30 and w[2, 0] < 1e-30  # other samples get ~0
    (w * torch.randn(6, 5, generator=g)).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert MASKED > -1e5 and np.isfinite(MASKED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dskd_cma_finite_when_a_sample_has_no_teacher_rows(dtype):
    algo, batch, hidden, weight, *_ = dskd("cma", dtype=torch.float32)
    keep = batch.extras["ct_teacher_sample"] == 0  # sample 1 lost all its teacher rows
    batch.teacher_hidden = batch.teacher_hidden[keep].to(dtype)
    for key in ("ct_teacher_sample", "ct_teacher_input_ids", "ct_teacher_target_ids"):
        batch.extras[key] = batch.extras[key][keep]
    out = algo(batch, hidden.to(dtype), weight.to(dtype), normalizer=12.0)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert float(out["aligned"]) == pytest.approx(7 / 12)  # sample 0's 7 rows
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in algo.projector_parameters())


def test_dskd_param_groups_and_identical_init():
    a, *_ = dskd("cma", seed=5, dskd_projector_lr=3e-3)
    b, *_ = dskd("cma", seed=5)
    groups = a.param_groups()
    assert len(groups) == 1 and groups[0]["lr"] == 3e-3 and groups[0]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in a.parameters()}
    assert len(groups[0]["params"]) == 2  # t2s and query weights (no bias; s2t is fixed)
    torch.manual_seed(123)  # the global RNG does not matter: every rank starts the same
    for (n, p), (_, r) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, r), n
    assert not any("teacher_head" in k for k in a.state_dict())


def test_dskd_state_dict_round_trip(tmp_path):
    algo, batch, hidden, weight, *_ = dskd("eta", dtype=torch.float32, seed=1)
    assert {"t2s.weight", "s2t_map", "ready"} <= set(algo.state_dict())
    opt = torch.optim.AdamW(algo.param_groups())
    for _ in range(3):
        opt.zero_grad()
        algo(batch, hidden, weight, normalizer=12.0)["loss"].backward()
        opt.step()
    torch.save(algo.state_dict(), tmp_path / "algo.pt")
    fresh, *_ = dskd("eta", dtype=torch.float32, seed=99)
    before = fresh(batch, hidden, weight, normalizer=12.0)["loss"]
    fresh.load_state_dict(torch.load(tmp_path / "algo.pt", weights_only=True))
    after = fresh(batch, hidden, weight, normalizer=12.0)["loss"]
    expect = algo(batch, hidden, weight, normalizer=12.0)["loss"]
    assert not torch.equal(before, expect)
    torch.testing.assert_close(after, expect, rtol=0, atol=0)


# ---- the trainer's alignment join -------------------------------------------------------------
class _States:
    def __init__(self, positions, hidden):
        self.positions, self.hidden = torch.tensor(positions), hidden


class _Cache:
    def __init__(self, states):
        self.states = states

    def get(self, sid):
        return self.states[sid]


def test_batch_builder_joins_teacher_rows_by_alignment():
    tokens = np.array([5, 6, 7, 8, 9, 5, 6, 7], dtype=np.int64)
    mask = np.array([0, 0, 1, 1, 1, 0, 1, 1], dtype=np.int8)
    split = PreparedSplit(["a", "b"], tokens, mask, np.array([0, 5, 8]),
                          ct_align=[np.array([[1, 2], [3, 5]]), np.array([[1, 1]])])
    # teacher loss positions: a -> [2, 3, 5], b -> [0, 1]
    cache = _Cache({"a": _States([2, 3, 5], torch.arange(3.0)[:, None].repeat(1, 4)),
                    "b": _States([0, 1], 10 + torch.arange(2.0)[:, None].repeat(1, 4))})
    for packing in (False, True):
        batch = BatchBuilder(split, pad_id=0, packing=packing, teacher=cache).build([0, 1])
        # student loss positions: a -> [1, 2, 3], b -> [0, 1]
        assert batch.num_loss_tokens == 5 and batch.teacher_hidden.shape == (5, 4)
        assert batch.extras["ct_student_index"].tolist() == [0, 2, 4]
        assert batch.extras["ct_teacher_index"].tolist() == [0, 2, 4]
        assert batch.teacher_hidden[batch.extras["ct_teacher_index"], 0].tolist() == [0, 2, 11]
        assert batch.extras["ct_student_sample"].tolist() == [0, 0, 0, 1, 1]
        assert batch.extras["ct_teacher_sample"].tolist() == [0, 0, 0, 1, 1]


def test_batch_builder_refuses_a_stale_alignment():
    from kubedistill.errors import ArtifactMismatch

    split = PreparedSplit(["a"], np.array([5, 6, 7], dtype=np.int64),
                          np.array([0, 1, 1], dtype=np.int8), np.array([0, 3]),
                          ct_align=[np.array([[1, 4]])])
    cache = _Cache({"a": _States([0, 1], torch.zeros(2, 4))})
    with pytest.raises(ArtifactMismatch, match="alignment"):
        BatchBuilder(split, pad_id=0, packing=False, teacher=cache).build([0])
