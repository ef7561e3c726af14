"""Cross-tokenizer algorithms: simple_ctkd and dskd (projectors, CMA, checkpoints), and the
trainer's alignment join."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kubedistill.algorithms import MicroBatch, build_algorithm
from kubedistill.algorithms.dskd import MASKED, cma_attention
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
    torch.testing.assert_close(out["loss"], 0.7 * ce + 0.3 * 4.0 * kd, rtol=1e-5, atol=1e-6)
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
def dskd(align="eta", dtype=torch.float64, seed=3, **kv):
    kv.setdefault("kd_ratio", 0.5)
    cfg = config(kd_algorithm="dskd", dskd_token_align=align, seed=seed,
                 chunked_loss_size=None, **kv)
    batch, hidden, weight, head, _ = inputs(dtype=dtype)
    algo = build_algorithm(cfg, head, hidden.shape[1]).to(dtype)
    return algo, batch, hidden, weight


@pytest.mark.parametrize("align", ["eta", "cma"])
@pytest.mark.parametrize("kd_ratio, trained", [
    (0.0, ("t2s", "query", "key")),  # CE_t2s: student-space projector (and CMA attention)
    (0.5, ("s2t",)),  # KD_t: teacher-space projector
])
def test_dskd_projector_gradients(align, kd_ratio, trained):
    """gradcheck (float64) of the loss in the projectors. KD_s uses sg(t2s ...), so t2s and
    the attention are checked where only CE_t2s reaches them (kd_ratio 0), s2t with KD on."""
    algo, batch, hidden, weight = dskd(align, kd_ratio=kd_ratio,
                                       dskd_topk_vocab=7 if align == "eta" else -1)
    state = {n: p.detach() for n, p in algo.named_parameters()}
    names = [n for n in state if n.split(".")[0] in trained]
    assert names
    params = tuple(state[n].clone().requires_grad_(True) for n in names)
    hidden, weight = hidden.detach(), weight.detach()

    def loss(*ps):
        full = dict(state, **dict(zip(names, ps, strict=True)))
        return torch.func.functional_call(algo, full, (batch, hidden, weight, 20.0))["loss"]

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)
    grads = torch.autograd.grad(loss(*params), params)
    assert all(g.abs().sum() > 0 for g in grads)  # every projector takes part


def test_dskd_topk_logits_are_the_full_logits_at_the_teacher_top_ids():
    from kubedistill.algorithms.dskd import head_logits

    _, _, _, head, _ = inputs(dtype=torch.float64)
    head.bias = torch.randn(head.vocab_size, dtype=torch.float64)
    head.softcap, head.scale = 5.0, 0.8
    h = torch.randn(6, head.hidden_size, dtype=torch.float64, requires_grad=True)
    ids = torch.randn(6, head.vocab_size).topk(4, dim=-1).indices
    picked = head_logits(head, h, ids)
    full = head_logits(head, h).gather(-1, ids)
    torch.testing.assert_close(picked, full)
    g1, = torch.autograd.grad(picked.sum(), h)
    g2, = torch.autograd.grad(full.sum(), h)
    torch.testing.assert_close(g1, g2)


def test_dskd_eta_parts_add_up():
    algo, batch, hidden, weight = dskd("eta", dtype=torch.float32)
    out = algo(batch, hidden, weight, normalizer=20.0)
    for k in ("ce", "kd", "kd_student_space", "kd_teacher_space", "ce_t2s", "aligned"):
        assert torch.isfinite(out[k]), k
    torch.testing.assert_close(out["kd"], out["kd_student_space"] + out["kd_teacher_space"])
    expect = 0.5 * out["ce"] + 0.5 * out["kd"] + out["ce_t2s"]
    torch.testing.assert_close(out["loss"].detach(), expect, rtol=1e-5, atol=1e-6)
    assert float(out["aligned"]) == pytest.approx(7 / 20)


def test_dskd_same_tokenizer_pairs_rows_one_to_one():
    algo, batch, hidden, weight = dskd("eta", dtype=torch.float32)
    batch.extras.clear()
    batch.teacher_hidden = batch.teacher_hidden.new_zeros(12, 6).normal_()
    out = algo(batch, hidden, weight, normalizer=12.0)
    assert float(out["aligned"]) == pytest.approx(1.0)


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
    algo, batch, hidden, weight = dskd("cma", dtype=torch.float32)
    keep = batch.extras["ct_teacher_sample"] == 0  # sample 1 lost all its teacher rows
    batch.teacher_hidden = batch.teacher_hidden[keep].to(dtype)
    batch.extras["ct_teacher_sample"] = batch.extras["ct_teacher_sample"][keep]
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
    assert len(groups[0]["params"]) == 8  # s2t, t2s, query, key: weight + bias
    torch.manual_seed(123)  # the global RNG does not matter: every rank starts the same
    for (n, p), (_, r) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, r), n
    assert not any("teacher_head" in k for k in a.state_dict())


def test_dskd_state_dict_round_trip(tmp_path):
    algo, batch, hidden, weight = dskd("eta", dtype=torch.float32, seed=1)
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
