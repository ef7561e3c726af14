"""On-policy with SGLang (GPU only; skipped without CUDA): the rollout engine's finish
reasons and log-probs, weight pushes with ``update_weights_from_tensor``, memory
release/resume, and a short colocated on-policy run with sglang engines."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def sglang_engine(smollm2_dir):
    pytest.importorskip("sglang")
    from kubedistill.config import Config
    from kubedistill.rollout.sglang import SGLangRolloutEngine

    cfg = Config()
    for k, v in dict(rollout_mem_fraction_static=0.3, enable_sleep=True, seed=0).items():
        cfg.set(k, v)
    engine = SGLangRolloutEngine.from_config(cfg, smollm2_dir)
    yield engine
    engine.close()


def test_sglang_rollouts_finish_reasons_and_logprobs(sglang_engine, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                     add_generation_prompt=True)
    samples = sglang_engine.generate([prompt, prompt[:5]], n_samples_per_prompt=2,
                                     max_new_tokens=48, temperature=1.0, top_p=1.0, seed=3)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    for s in samples:
        assert len(s.logprobs) == len(s.response_ids) >= 1
        body = s.response_ids[:-1] if s.finish_reason == "stop" else s.response_ids
        assert not sglang_engine.stop_ids & set(body)
        if s.finish_reason == "stop":
            assert s.response_ids[-1] in sglang_engine.stop_ids
        else:
            assert len(s.response_ids) == 48
    short = sglang_engine.generate([prompt], n_samples_per_prompt=1, max_new_tokens=2,
                                   temperature=1.0, top_p=1.0, seed=3)[0]
    assert short.finish_reason in ("stop", "length") and len(short.response_ids) <= 2


def test_sglang_weight_push_sleep_and_wake(sglang_engine, smollm2_dir):
    from safetensors.torch import load_file

    from kubedistill.rollout.sync import buckets
    from kubedistill.train.fsdp import DistEnv

    name = "model.layers.3.mlp.up_proj.weight"
    state = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    changed = {name: torch.full_like(state[name], 0.25)}
    sglang_engine.sleep()
    sglang_engine.wake()
    env = DistEnv(0, 1, 0, torch.device("cuda"))
    from kubedistill.rollout.sync import push

    assert push(changed, sglang_engine, env, dtype=torch.bfloat16) > 0
    got = sglang_engine.engine.get_weights_by_name(name, truncate_size=8)
    assert torch.allclose(torch.as_tensor(got, dtype=torch.float32).flatten()[:8],
                          torch.full((8,), 0.25))
    push({name: state[name]}, sglang_engine, env, dtype=torch.bfloat16)
    assert len(list(buckets(state, bucket_bytes=64 * 2**20))) > 1
    out = sglang_engine.generate([[1, 2, 3]], n_samples_per_prompt=1, max_new_tokens=4,
                                 temperature=0.0, top_p=1.0, seed=0)
    assert len(out[0].response_ids) >= 1


def test_colocated_on_policy_run_with_sglang(tmp_path, smollm2_dir):
    pytest.importorskip("sglang")
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from _prepared import write_prepared

    from kubedistill.config import Config
    from kubedistill.train.launch import train

    prepared = write_prepared(str(tmp_path / "prepared"), smollm2_dir, n_train=16, n_eval=4)
    cfg = Config()
    for k, v in dict(student_from_teacher_layers="0,10,20,29",
                     teacher_name_or_path=smollm2_dir, prepared_path=prepared,
                     work_dir=str(tmp_path / "wd"), save_path=str(tmp_path / "model"),
                     ckpt_path=str(tmp_path / "ckpt"), rollout_num_engines=1,
                     rollout_backend="sglang", teacher_backend="sglang", enable_sleep=True,
                     rollout_mem_fraction_static=0.2, teacher_mem_fraction_static=0.2,
                     teacher_tp_size=1, rollout_batch_size=8, generate_max_len=32,
                     kd_loss_fn="rkl", kd_ratio=1.0, train_batch_size=8,
                     micro_train_batch_size=4, learning_rate=1e-4, max_steps=2,
                     num_gpus_per_node=1, tracking_uri="off", device="cuda").items():
        cfg.set(k, v)
    train(cfg)
    with open(tmp_path / "wd" / "train" / "train_log.jsonl") as f:
        iters = [r for r in map(json.loads, f) if "iteration" in r]
    assert [r["iteration"] for r in iters] == [1, 2]
    assert all(r["onpolicy/kl"] > 0 for r in iters)
