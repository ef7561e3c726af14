"""The evaluate stage on cross-tokenizer data: KL(teacher || student) and top-1 agreement at
the ``ct_align`` pairs, both distributions renormalised over the K shared ids of the
vocabulary map (as simple_ctkd compares them).

1. Hand-made tensors: cache and live signals against a float64 reference.
2. End to end with the REAL tokenizers (tiny SmolLM2-tokenizer student, tiny Qwen2.5-tokenizer
   teacher; skipped when the packaged Qwen2.5 is not installed): prepare + cache-teacher,
   evaluate from the cache and from a live teacher, and the training diagnostics agree.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kubedistill.config import Config
from kubedistill.crosstok.vocab import VocabMap
from kubedistill.evaluate import scoring
from kubedistill.evaluate.teacher_signal import CacheSignal, LiveSignal
from kubedistill.teacher.head import TeacherHead
from kubedistill.teacher.reader import TeacherStates

V_S, V_T, D_S, D_T = 11, 13, 4, 5
VMAP = VocabMap(torch.tensor([0, 2, 3, 5, 7, 10]), torch.tensor([12, 1, 4, 0, 9, 6]))
# (input_ids, loss_mask, teacher_input_ids, teacher_loss_mask, pairs)
ROWS = [([1, 4, 2, 9], [0, 1, 1, 1], [3, 3, 8], [0, 1, 1], []),  # no pairs: not compared
        ([5, 1, 0, 7, 3], [0, 0, 1, 1, 1], [2, 5, 11, 7, 0, 9, 12, 4],
         [0, 0, 0, 0, 1, 1, 1, 1], [(1, 3), (3, 6)]),
        ([6, 8, 3, 2, 10, 4, 1], [0, 0, 0, 1, 1, 1, 1], [7, 1, 12, 6, 3, 5],
         [0, 0, 1, 1, 1, 1], [(2, 1), (4, 2), (5, 4)])]


class TokenTeacher(torch.nn.Module):
    """A context-free 'teacher': hidden(q) = E[token_q] + P[q]; head with a bias."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.emb = torch.randn(V_T, D_T, generator=gen)
        self.pos = torch.randn(16, D_T, generator=gen)
        self.lm_head = torch.nn.Linear(D_T, V_T).requires_grad_(False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(V_T, D_T, generator=gen) * 2)
            self.lm_head.bias.copy_(torch.randn(V_T, generator=gen))
        self.config = SimpleNamespace()

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb[ids] + self.pos[:ids.shape[-1]]

    @property
    def base_model(self):
        return lambda input_ids, attention_mask: SimpleNamespace(
            last_hidden_state=self.hidden(input_ids))

    def get_output_embeddings(self):
        return self.lm_head


def _rows() -> list[dict]:
    return [{"id": f"r{i}", "input_ids": s, "loss_mask": m, "teacher_input_ids": t,
             "teacher_loss_mask": tm, "ct_align": [v for pq in pairs for v in pq]}
            for i, (s, m, t, tm, pairs) in enumerate(ROWS)]


def _stats(signal, rows, student_hidden, w_s, max_tokens) -> dict:
    stats = scoring.TokenStats()
    head = TeacherHead(w_s)
    for batch in scoring.make_batches([r["input_ids"] for r in rows],
                                      [r["loss_mask"] for r in rows], max_tokens):
        b, pos = batch.target_positions()  # what target_hidden gathers
        hidden = torch.stack([student_hidden[batch.rows[k]][p] for k, p in
                              zip(b.tolist(), pos.tolist(), strict=True)])
        t, keep = signal.logits(batch, rows, b)
        stats.add(head, hidden, batch.input_ids[b, pos + 1], b, t, keep, signal.student_cols)
    return stats.means()


def test_aligned_shared_vocab_kl_matches_reference():
    gen = torch.Generator().manual_seed(2)
    rows = _rows()
    w_s = torch.randn(V_S, D_S, generator=gen) * 2
    student_hidden = [torch.randn(len(r["input_ids"]), D_S, generator=gen) for r in rows]
    teacher = TokenTeacher(gen)

    class FakeCache:  # the teacher's hidden states at ALL its target positions
        def __contains__(self, sid):
            return True

        def head(self):
            return TeacherHead.from_model(teacher)

        def get(self, sid):
            r = next(x for x in rows if x["id"] == sid)
            q = [i - 1 for i, m in enumerate(r["teacher_loss_mask"]) if m and i > 0]
            return TeacherStates(torch.tensor(q), teacher.hidden(
                torch.tensor(r["teacher_input_ids"]))[q])

    kl = agree = n = 0
    for r, h_s in zip(rows, student_hidden, strict=True):  # float64 reference
        h_t = teacher.hidden(torch.tensor(r["teacher_input_ids"])).double()
        for p, q in zip(r["ct_align"][::2], r["ct_align"][1::2], strict=True):
            s = (h_s[p].double() @ w_s.double().T)[VMAP.student_ids]
            t = (h_t[q] @ teacher.lm_head.weight.double().T
                 + teacher.lm_head.bias.double())[VMAP.teacher_ids]
            ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
            kl += float((lt.exp() * (lt - ls)).sum())
            agree += int(ls.argmax() == lt.argmax())
            n += 1
    assert n == 5 and 0 < agree < n  # a case where the argmax both agrees and disagrees
    for signal in (CacheSignal(FakeCache(), VMAP), LiveSignal(teacher, "cpu", VMAP)):
        assert signal.space == "shared_vocab_aligned"
        for max_tokens in (64, 10):  # one batch; two batches (rows reordered by length)
            got = _stats(signal, rows, student_hidden, w_s, max_tokens)
            assert got["eval_kl_tokens"] == n
            assert got["eval_kl"] == pytest.approx(kl / n, rel=1e-5)
            assert got["eval_top1_agreement"] == agree / n
            assert got["eval_tokens"] == 3 + 3 + 4  # CE stays over every target


def test_alignment_must_name_target_positions():
    from kubedistill.errors import DataError

    rows = _rows()
    rows[1]["ct_align"] = [0, 3]  # student position 0 predicts a non-target
    batch = next(scoring.make_batches([r["input_ids"] for r in rows],
                                      [r["loss_mask"] for r in rows], 64))
    signal = LiveSignal(TokenTeacher(torch.Generator().manual_seed(1)), "cpu", VMAP)
    with pytest.raises(DataError, match="ct_align"):
        signal.logits(batch, rows, batch.target_positions()[0])


# ---- end to end with the real tokenizers ----------------------------------------------------


def make(base: dict, **over) -> Config:
    return Config().update(dict(base, **over))


@pytest.fixture(scope="module")
def base(tiny_model_dir, qwen_tiny_teacher, tmp_path_factory) -> dict:
    from kubedistill.data.prepare import prepare
    from kubedistill.teacher.cache import cache_teacher

    root = tmp_path_factory.mktemp("ct_eval")
    base = dict(student_name_or_path=tiny_model_dir, teacher_name_or_path=qwen_tiny_teacher,
                save_path=tiny_model_dir,  # evaluate the untrained student
                train_dataset_path="packaged:gsm8k-train",
                eval_dataset_path="packaged:gsm8k-eval", input_key="question",
                output_key="answer", label_key="label", max_samples=2, eval_max_samples=3,
                max_len=256, prepared_path=str(root / "prepared"),
                teacher_cache_path=str(root / "cache"), kd_algorithm="simple_ctkd",
                kd_ratio=0.5, teacher_backend="hf", cache_dtype="fp32", eval_task="none",
                eval_num_generations=0, tracking_uri="off", device="cpu",
                attn_implementation="sdpa", work_dir=str(root / "wd"))
    cfg = make(base)
    prepare(cfg)
    cache_teacher(cfg)
    return base


def test_evaluate_cross_tokenizer_cache_live_and_training_agree(base, tmp_path):
    from kubedistill.data.prepared import load_split
    from kubedistill.evaluate.stage import evaluate

    cached = evaluate(make(base, work_dir=str(tmp_path / "cached")))
    pairs = sum(len(r["ct_align"]) // 2 for r in
                load_split(base["prepared_path"], "eval").to_pylist())
    assert cached["teacher_signal"] == "cache"
    assert cached["eval_kl_space"] == "shared_vocab_aligned"
    assert cached["eval_kl_tokens"] == pairs > 0  # every aligned pair joined with the cache
    assert math.isfinite(cached["eval_kl"]) and cached["eval_kl"] > 0
    assert 0 <= cached["eval_top1_agreement"] <= 1
    assert cached["eval_tokens"] > pairs  # CE covers every target, KL the aligned ones

    live = evaluate(make(base, work_dir=str(tmp_path / "live"),
                         teacher_cache_path=str(tmp_path / "no_cache")))
    assert live["teacher_signal"] == "live"
    assert live["eval_kl_tokens"] == pairs
    assert live["eval_kl"] == pytest.approx(cached["eval_kl"], rel=1e-4)
    assert abs(live["eval_top1_agreement"] - cached["eval_top1_agreement"]) <= 1 / pairs
    assert live["eval_ce"] == cached["eval_ce"]

    assert _training_diagnostics_kl(make(base)) == pytest.approx(cached["eval_kl"], rel=1e-4)


def _training_diagnostics_kl(cfg: Config) -> float:
    """Mean KL of the on-policy diagnostics wrapped around simple_ctkd on the eval split."""
    from kubedistill.algorithms.simple_ctkd import SimpleCTKD
    from kubedistill.models import load_causal_lm
    from kubedistill.teacher.reader import TeacherCache
    from kubedistill.train.data import BatchBuilder, load_prepared
    from kubedistill.train.diagnostics import WithDiagnostics

    split = load_prepared(cfg.prepared_path, "eval")
    cache = TeacherCache(cfg.teacher_cache_path)
    batch = BatchBuilder(split, pad_id=0, packing=False, teacher=cache).build(
        list(range(len(split))))
    vmap = VocabMap.load(cfg.prepared_path)
    algo = WithDiagnostics(SimpleCTKD(cfg, teacher_head=cache.head(), vocab_map=vmap),
                           vocab_map=vmap)
    student = load_causal_lm(cfg.model.student_name_or_path)
    with torch.no_grad():
        h = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        hidden = h.last_hidden_state.flatten(0, 1)[batch.loss_index]
        out = algo(batch, hidden, student.get_output_embeddings().weight, 1.0)
    return float(out["kl_ts"] / out["rows"])
