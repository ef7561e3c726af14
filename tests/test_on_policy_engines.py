"""KDFlow's engine flags in the on-policy loop, with the hf backends (tiny Llamas):

- ``rollout_num_engines > 1``: several rollout engines, the prompts split across them,
  samples indexed into the whole prompt list, weights synced into every engine;
- ``teacher_forward_n_batches``: one live-teacher forward per N global batches of samples;
- several SGLang engines on a node without the GPUs for them: refused with the reason.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from test_on_policy import _config, _rows

from kubedistill.config import Config
from kubedistill.errors import ConfigError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from kubedistill.data.prepared import to_table

    root = tmp_path_factory.mktemp("prepared_engines")
    for split, n, seed in (("train", 8, 0), ("eval", 2, 1)):
        pq.write_table(to_table(_rows(n, seed, split)), root / f"{split}.parquet")
    return str(root)


@pytest.fixture(scope="module")
def base(tiny_model_dir, tiny_teacher_dir, prepared) -> dict:
    return dict(student_name_or_path=tiny_model_dir, teacher_name_or_path=tiny_teacher_dir,
                prepared_path=prepared, rollout_num_engines=1, rollout_backend="hf",
                teacher_backend="hf", rollout_batch_size=4, n_samples_per_prompt=2,
                generate_max_len=6, prompt_max_len=32, kd_algorithm="vanilla_kd",
                kd_loss_fn="rkl", kd_ratio=1.0, num_gpus_per_node=1, train_batch_size=4,
                micro_train_batch_size=2, learning_rate=5e-3, lr_warmup_ratio=0.0,
                chunked_loss_size=16, seed=5, tracking_uri="off", device="cpu")


def test_pool_splits_prompts_across_engines(tiny_model_dir):
    from kubedistill.models import load_causal_lm
    from kubedistill.rollout.hf import HFRolloutEngine
    from kubedistill.rollout.pool import RolloutPool, shard_bounds

    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(2, 3) == [(0, 1), (1, 2), (2, 2)]
    calls: list[int] = []

    class Counting(HFRolloutEngine):
        def generate(self, prompts, **kw):
            calls.append(len(prompts))
            return super().generate(prompts, **kw)

    engines = [Counting(load_causal_lm(tiny_model_dir)) for _ in range(2)]
    pool = RolloutPool(engines)
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(5)]
    samples = pool.generate(prompts, n_samples_per_prompt=2, max_new_tokens=4,
                            temperature=1.0, top_p=1.0, seed=1)
    assert calls == [3, 2]
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(s.prompt_ids == prompts[s.prompt_index] for s in samples)
    again = pool.generate(prompts, n_samples_per_prompt=2, max_new_tokens=4,
                          temperature=1.0, top_p=1.0, seed=1)
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]  # seeded
    name = "model.layers.0.mlp.up_proj.weight"
    pool.load_weights([(name, torch.full_like(engines[0].state_dict()[name], 0.5))])
    assert all(torch.all(e.state_dict()[name] == 0.5) for e in engines)
    pool.sleep()
    pool.wake()
    pool.close()
    assert all(e.model is None for e in engines)


def test_several_sglang_engines_need_their_gpus():
    from kubedistill.rollout.factory import make_rollout_engine

    cfg = Config()
    for k, v in dict(rollout_num_engines=2, rollout_tp_size=2, rollout_backend="sglang").items():
        cfg.set(k, v)
    if torch.cuda.device_count() >= 4:
        pytest.skip("this node has the GPUs")
    with pytest.raises(ConfigError, match="needs 4 GPUs"):
        make_rollout_engine(cfg, "/m", "cuda")


def test_two_rollout_engines_each_hold_the_student_after_sync(world_of_one, base, tmp_path):
    from kubedistill.rollout.pool import RolloutPool
    from kubedistill.train.fsdp import full_state_dict
    from kubedistill.train.on_policy import OnPolicyTrainer
    from kubedistill.train.trainer import _progress

    trainer = OnPolicyTrainer(_config(tmp_path, "pool", base, rollout_num_engines=2),
                              world_of_one)
    try:
        assert isinstance(trainer.rollout_engine, RolloutPool)
        assert len(trainer.rollout_engine.engines) == 2
        trainer.sync()
        times: dict = {}
        split, teacher, stats = trainer.rollout(times)
        assert stats["rollout/samples"] == 8 and stats["rollout/prompts"] == 4
        trainer.train_iteration(split, teacher, stats, _progress(1, 0, False), times)
        trainer.sync(times)
        student = full_state_dict(trainer.module.student)
        for engine in trainer.rollout_engine.engines:
            state = engine.state_dict()
            assert all(torch.equal(state[k], v) for k, v in student.items())
    finally:
        trainer.close_engines()


@pytest.mark.parametrize("n_batches,calls", [(1, [4, 4]), (2, [8])])
def test_teacher_forwards_n_global_batches_at_once(world_of_one, base, tmp_path, n_batches,
                                                  calls):
    from kubedistill.train.on_policy import OnPolicyTrainer

    trainer = OnPolicyTrainer(_config(tmp_path, f"n{n_batches}", base,
                                      teacher_forward_n_batches=n_batches), world_of_one)
    try:
        seen: list[int] = []
        real = trainer.teacher_engine.final_states
        trainer.teacher_engine.final_states = \
            lambda seqs, pos, *images: seen.append(len(seqs)) or real(seqs, pos, *images)
        trainer.sync()
        trainer.rollout({})
        assert seen == calls  # 4 prompts x 2 samples, train_batch_size 4
    finally:
        trainer.close_engines()


def test_teacher_forward_n_batches_must_be_positive(base, tmp_path):
    from kubedistill.train.on_policy import check_config

    with pytest.raises(ConfigError, match="teacher_forward_n_batches"):
        check_config(_config(tmp_path, "bad", base, teacher_forward_n_batches=0))
