"""Trainer pieces without torchrun: step planning, micro-batches, packing, teacher join,
learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kubedistill.errors import ArtifactMismatch
from kubedistill.train import data
from kubedistill.train.optim import lr_factor


def make_split(n: int, seed: int = 0, lo: int = 6, hi: int = 30) -> data.PreparedSplit:
    rng = np.random.default_rng(seed)
    toks, masks, offsets = [], [], [0]
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        prompt = int(rng.integers(1, length - 1))
        toks.append(rng.integers(0, 1000, length))
        masks.append(np.array([0] * prompt + [1] * (length - prompt), dtype=np.int8))
        offsets.append(offsets[-1] + length)
    return data.PreparedSplit([f"s:{i}" for i in range(n)], np.concatenate(toks),
                              np.concatenate(masks), np.array(offsets))


@pytest.mark.parametrize("world,micro,max_tokens,packing", [
    (1, 1, 0, False), (2, 1, 0, False), (2, 2, 0, True), (3, 1, 0, False),
    (2, 1, 64, False), (2, 1, 64, True), (4, 1, 40, False)])
def test_plan_covers_every_sample_once_with_equal_micro_counts(world, micro, max_tokens,
                                                                 packing):
    split = make_split(23)
    order = data.epoch_order(len(split), seed=7, epoch=1)
    steps = data.steps_per_epoch(len(split), 8)
    assert steps == 3  # 8 + 8 + 7: the remainder is a smaller last step
    seen = []
    for k in range(steps):
        plan = data.plan_step(order, 1, k, split.lengths, world, batch_size=8,
                              micro_bsz=micro, max_tokens=max_tokens, packing=packing)
        assert sorted(plan.samples) == sorted(order[8 * k:8 * (k + 1)].tolist())
        counts = {len(rank) for rank in plan.micro}
        assert len(counts) == 1, "every rank must run the same number of micro-batches"
        real = [i for rank in plan.micro for mb, w in rank if w == 1.0 for i in mb]
        assert sorted(real) == sorted(plan.samples)
        for rank in plan.micro:
            for mb, w in rank:
                assert mb and w in (0.0, 1.0)
                if max_tokens and w and len(mb) > 1:
                    lens = split.lengths[mb]
                    cost = lens.sum() if packing else len(mb) * lens.max()
                    assert cost <= max_tokens
                if not max_tokens and w:
                    assert len(mb) <= micro
        seen += real
    assert sorted(seen) == list(range(len(split)))


def test_epoch_order_is_seeded_and_differs_per_epoch():
    a, b = data.epoch_order(50, 1, 0), data.epoch_order(50, 1, 0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, data.epoch_order(50, 1, 1))
    assert sorted(a.tolist()) == list(range(50))


def test_dynamic_plan_balances_tokens_over_ranks():
    split = make_split(64, seed=3, lo=4, hi=120)
    plan = data.plan_step(np.arange(64), 0, 0, split.lengths, 4, batch_size=64, micro_bsz=1,
                          max_tokens=256, packing=True)
    loads = [sum(int(split.lengths[i]) for mb, w in rank if w for i in mb) for rank in plan.micro]
    assert max(loads) - min(loads) <= split.lengths.max()


def test_zero_sample_rank_gets_a_zero_weight_micro_batch():
    split = make_split(5)
    plan = data.plan_step(np.arange(5), 0, 1, split.lengths, 2, batch_size=4, micro_bsz=1)
    assert plan.samples == [4]
    assert plan.micro[0] == [([4], 1.0)] and plan.micro[1] == [([4], 0.0)]


def test_micro_batch_layout_unpacked_and_packed():
    split = make_split(3)
    for packing in (False, True):
        mb = data.BatchBuilder(split, pad_id=0, packing=packing).build([0, 1, 2])
        flat = mb.input_ids.reshape(-1)
        assert torch.equal(flat[mb.loss_index + 1], mb.target_ids)
        assert mb.num_loss_tokens == int(split.loss_tokens[[0, 1, 2]].sum())
        assert mb.sample_ids == ["s:0", "s:1", "s:2"]
        if packing:
            assert mb.attention_mask is None and mb.input_ids.shape[0] == 1
            starts = (mb.position_ids[0] == 0).nonzero().flatten().tolist()
            assert starts == [0, int(split.lengths[0]), int(split.lengths[:2].sum())]
        else:
            assert mb.attention_mask.sum() == split.lengths[[0, 1, 2]].sum()


def test_packed_rows_give_the_same_hidden_states_as_padded_rows(tiny_model_dir):
    """sdpa through transformers' packed-sequence path isolates samples in one row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    split = make_split(3, seed=5)
    outs = []
    for packing in (False, True):
        mb = data.BatchBuilder(split, pad_id=0, packing=packing).build([0, 1, 2])
        with torch.no_grad():
            h = model.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                            position_ids=mb.position_ids, use_cache=False).last_hidden_state
        outs.append(h.reshape(-1, h.shape[-1])[mb.loss_index])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def _rows_of(split: data.PreparedSplit) -> list[dict]:
    rows = []
    for i, sid in enumerate(split.ids):
        toks, mask = split.sample(i)
        prompt = int(np.argmax(mask))
        rows.append({"id": sid, "input_ids": toks.tolist(), "loss_mask": mask.tolist(),
                     "prompt_len": prompt, "response": ""})
    return rows


@pytest.fixture(scope="module")
def real_cache(tiny_teacher_dir, tmp_path_factory):
    """The REAL teacher cache stage (tiny teacher, fp32) over ``make_split(3)`` written as
    prepared parquet; returns (split, TeacherCache)."""
    from _prepared import write_splits

    from kubedistill.config import Config
    from kubedistill.teacher.cache import cache_teacher
    from kubedistill.teacher.reader import TeacherCache

    root = tmp_path_factory.mktemp("train_data_cache")
    split = make_split(3)
    write_splits(str(root / "prepared"), {"train": _rows_of(split)})
    cfg = Config().update(dict(teacher_name_or_path=tiny_teacher_dir,
                               prepared_path=str(root / "prepared"),
                               teacher_cache_path=str(root / "cache"), teacher_backend="hf",
                               cache_dtype="fp32", work_dir=str(root / "wd")))
    cache_teacher(cfg)
    return split, TeacherCache(str(root / "cache"))


def test_teacher_states_join_rows_with_loss_index(real_cache):
    """Packed micro-batch [2, 0]: the teacher rows are sample 2's cached states, then sample
    0's, one per loss token, in the order of ``loss_index``."""
    split, cache = real_cache
    mb = data.BatchBuilder(split, pad_id=0, packing=True, teacher=cache).build([2, 0])
    assert mb.teacher_hidden.shape == (mb.num_loss_tokens, 96)
    expected = torch.cat([cache.get("s:2").hidden, cache.get("s:0").hidden]).float()
    assert torch.equal(mb.teacher_hidden.float(), expected)
    assert int(split.loss_tokens[2]) + int(split.loss_tokens[0]) == mb.num_loss_tokens


def test_teacher_row_count_mismatch_names_the_sample(real_cache):
    """The same ids with sample 1's loss mask one token shorter than when the cache was
    built (a stale cache): ArtifactMismatch naming s:1."""
    split, cache = real_cache
    mask = split.loss_mask.copy()
    start = int(split.offsets[1])
    mask[start + int(np.argmax(mask[start:]))] = 0  # the first loss token of s:1
    changed = data.PreparedSplit(list(split.ids), split.tokens, mask, split.offsets)
    data.BatchBuilder(changed, pad_id=0, packing=False, teacher=cache).build([0, 2])  # intact
    builder = data.BatchBuilder(changed, pad_id=0, packing=False, teacher=cache)
    with pytest.raises(ArtifactMismatch, match="'s:1': .* cached positions for .* student loss"):
        builder.build([0, 1])


def test_lr_schedules():
    kw = dict(total=10, warmup=2, min_ratio=0.1)
    assert lr_factor(0, kind="cosine_with_min_lr", **kw) == 0.0
    assert lr_factor(1, kind="cosine_with_min_lr", **kw) == 0.5
    assert lr_factor(2, kind="cosine_with_min_lr", **kw) == pytest.approx(1.0)
    assert lr_factor(10, kind="cosine_with_min_lr", **kw) == pytest.approx(0.1)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_factor(6, kind="cosine_with_min_lr", **kw) == pytest.approx(mid)
    assert lr_factor(6, kind="linear", **kw) == pytest.approx(0.5)
    assert lr_factor(0, kind="constant", **kw) == 1.0
    assert lr_factor(1, kind="constant_with_warmup", **kw) == 0.5
