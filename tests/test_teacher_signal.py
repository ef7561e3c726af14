"""The train-side teacher signal: top-k-only micro-batches, the algorithm's top-k loss, and
the settings a top-k signal refuses (ConfigError naming the keys)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kubedistill.algorithms import ALGORITHMS
from kubedistill.algorithms.signal import HiddenSignal, TopKSignal, train_signal
from kubedistill.config import Config
from kubedistill.errors import ConfigError
from kubedistill.losses import fused_kd_loss
from kubedistill.losses.topk import TopK, topk_loss
from kubedistill.train import data

V, K = 50, 6


def _split(n=4, seed=0):
    rng = np.random.default_rng(seed)
    toks, masks, offsets = [], [], [0]
    for _ in range(n):
        length = int(rng.integers(8, 16))
        toks.append(rng.integers(0, V, length))
        masks.append(np.array([0] * 3 + [1] * (length - 3), dtype=np.int8))
        offsets.append(offsets[-1] + length)
    return data.PreparedSplit([f"s:{i}" for i in range(n)], np.concatenate(toks),
                              np.concatenate(masks), np.array(offsets))


class TopKOnlyCache:
    """Like a ``teacher_signal: topk`` TeacherCache: no hidden states."""

    def __init__(self, split):
        self.rows = {}
        for i, sid in enumerate(split.ids):
            _, mask = split.sample(i)
            pos = np.nonzero(mask[1:])[0]
            g = torch.Generator().manual_seed(i)
            logp = torch.log_softmax(torch.randn(len(pos), V, generator=g), -1)
            lp, ids = logp.topk(K, -1)
            self.rows[sid] = SimpleNamespace(positions=torch.from_numpy(pos), hidden=None,
                                             topk_logprobs=lp, topk_ids=ids)

    def get(self, sid):
        return self.rows[sid]


def _cfg(**values):
    cfg = Config()
    cfg.update({"teacher_signal": "topk", "cache_topk": K, **values})
    return cfg.validate()


@pytest.mark.parametrize("packing", [False, True])
def test_top_k_only_batches_carry_top_k_rows_in_loss_order(packing):
    split = _split()
    cache = TopKOnlyCache(split)
    mb = data.BatchBuilder(split, pad_id=0, packing=packing, teacher=cache).build([2, 0, 3])
    assert mb.teacher_hidden is None
    want = torch.cat([cache.get(f"s:{i}").topk_ids for i in (2, 0, 3)])
    assert torch.equal(mb.teacher_topk_ids, want)
    assert mb.teacher_topk_logprobs.shape == (mb.num_loss_tokens, K)


def test_vanilla_kd_reads_the_top_k_signal_without_a_head():
    """kd_scale 1: no T^2 factor unless kd_temperature_squared (KDFlow's default)."""
    cfg = _cfg(kd_ratio=0.8, kd_loss_fn="rkl", kd_topk_mode="renorm", kd_temperature=2.0,
               chunked_loss_size=5)
    algo = ALGORITHMS["vanilla_kd"](cfg, teacher_head=None)
    assert isinstance(algo.signal, TopKSignal)
    split = _split()
    mb = data.BatchBuilder(split, pad_id=0, packing=True, teacher=TopKOnlyCache(split)).build(
        [0, 1])
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(mb.num_loss_tokens, 8, generator=g)
    weight = torch.randn(V, 8, generator=g)
    out = algo(mb, hidden, weight, normalizer=float(mb.num_loss_tokens))
    ref = fused_kd_loss(hidden, weight, mb.target_ids, loss_fn=topk_loss("rkl", "renorm"),
                        teacher_topk=TopK(mb.teacher_topk_ids, mb.teacher_topk_logprobs),
                        kd_ratio=0.8, temperature=2.0, kd_scale=1.0, chunk_size=None,
                        hparams={"jsd_beta": 0.5, "skew_lambda": 0.1, "adaptive_alpha": 0.5,
                                 "hrl_topk": 5})
    torch.testing.assert_close(out["loss"], ref.loss)
    assert float(out["kd"]) > 0


def test_hidden_is_the_default_signal():
    assert isinstance(train_signal(Config()), HiddenSignal)


@pytest.mark.parametrize("values, match", [
    ({"kd_temperature": 2.0}, "kd_topk_mode tail needs kd_temperature 1"),
    ({"kd_loss_fn": "top1_ce"}, "kd_loss_fn 'top1_ce' is not defined on top-k"),
    ({"kd_algorithm": "dskd"}, "kd_algorithm 'dskd' needs teacher hidden states"),
    ({"rollout_num_engines": 1}, "rollout_num_engines > 0"),
])
def test_top_k_refuses_what_it_cannot_serve(values, match):
    with pytest.raises(ConfigError, match=match):
        train_signal(_cfg(**values))


def test_config_checks_the_signal_keys():
    with pytest.raises(ConfigError, match="teacher_signal topk needs cache_topk > 0"):
        Config().update({"teacher_signal": "topk"}).validate()
    with pytest.raises(ConfigError, match="teacher_signal must be one of"):
        Config().update({"teacher_signal": "logits"}).validate()
    with pytest.raises(ConfigError, match="kd_topk_mode must be one of"):
        Config().update({"kd_topk_mode": "sparse"}).validate()


def test_cross_tokenizer_joins_refuse_a_top_k_only_cache():
    split = _split()
    split.ct_align = [np.array([[3, 3]]) for _ in split.ids]
    builder = data.BatchBuilder(split, pad_id=0, packing=False, teacher=TopKOnlyCache(split))
    with pytest.raises(ConfigError, match="cross-tokenizer data needs teacher hidden states"):
        builder.build([0])
