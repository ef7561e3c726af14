"""On-policy distillation with the hf engines, for real (tiny Llamas, SmolLM2 tokenizer).

- the hf rollout engine: finish reasons, stop tokens, truncation, log-probs, seeding;
- rollouts -> training samples: the loss mask covers exactly the sampled response;
- in-process (a world of one): after every sync the rollout engine holds the student's
  weights; the EMA self-distillation teacher follows theta_T <- a theta_T + (1-a) theta_S
  and the algorithm's teacher head follows theta_T;
- torchrun: a run of several iterations, and a run SIGKILLed after a checkpoint that resumes
  from the right iteration and ends with the same weights as the uninterrupted run.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _procs import kill_at_first_checkpoint

from kubedistill.config import Config
from kubedistill.rollout.engine import Sample, finish
from kubedistill.train.on_policy_data import rollout_split, sample_arrays, teacher_requests

N_PROMPTS = 12


def _rows(n: int, seed: int, split: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = int(rng.integers(3, 10))
        length = prompt + int(rng.integers(4, 12))
        ids = rng.integers(100, 400, length).tolist()
        t_prompt = [7, 8, 9] + ids[:prompt]  # a different teacher view of the same prompt
        rows.append({"id": f"{split}:{i}", "input_ids": ids, "prompt_len": prompt,
                     "loss_mask": [0] * prompt + [1] * (length - prompt), "response": "",
                     "teacher_input_ids": t_prompt + ids[prompt:],
                     "teacher_loss_mask": [0] * len(t_prompt) + [1] * (length - prompt),
                     "teacher_prompt_len": len(t_prompt)})
    rows.append({"id": f"{split}:long", "input_ids": list(range(100, 160)), "prompt_len": 50,
                 "loss_mask": [0] * 50 + [1] * 10, "response": ""})  # over prompt_max_len
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from _prepared import write_splits

    return write_splits(str(tmp_path_factory.mktemp("prepared")), {
        split: _rows(n, seed, split) for split, n, seed in (("train", N_PROMPTS, 0),
                                                            ("eval", 4, 1))})


def _config(root, name: str, base: dict, **over) -> Config:
    cfg, wd = Config(), root / name
    for k, v in dict(base, work_dir=str(wd), save_path=str(wd / "model"),
                     ckpt_path=str(wd / "ckpt"), **over).items():
        cfg.set(k, v)
    return cfg


@pytest.fixture(scope="module")
def base(tiny_model_dir, tiny_teacher_dir, prepared) -> dict:
    return dict(student_name_or_path=tiny_model_dir, teacher_name_or_path=tiny_teacher_dir,
                prepared_path=prepared, rollout_num_engines=1, rollout_backend="hf",
                teacher_backend="hf", rollout_batch_size=4, n_samples_per_prompt=2,
                generate_max_len=10, prompt_max_len=32, temperature=1.0,
                kd_algorithm="vanilla_kd", kd_loss_fn="rkl", kd_ratio=1.0,
                num_gpus_per_node=1, train_batch_size=4, micro_train_batch_size=2,
                learning_rate=5e-3, lr_warmup_ratio=0.0, min_lr=1e-4, num_epochs=1,
                save_steps=2, logging_steps=1, chunked_loss_size=16, seed=5,
                print_rollout_sample=True, tracking_uri="off", device="cpu")


# ---- rollout engine and samples ----------------------------------------------------------
def test_finish_cuts_after_the_first_stop_token():
    assert finish([5, 6, 2, 7, 2], {2}, 8) == ([5, 6, 2], "stop")
    assert finish([5, 6, 7], {2}, 3) == ([5, 6, 7], "length")
    assert finish([2], {2, 3}, 4) == ([2], "stop")


def test_hf_engine_finish_reasons_logprobs_and_seeding(tiny_model_dir):
    from kubedistill.rollout.hf import HFRolloutEngine

    stop = set(range(0, 49152, 7))  # frequent stop tokens: both finish reasons occur
    engine = HFRolloutEngine.from_pretrained(tiny_model_dir)
    engine.stop_ids = stop
    prompts = [[101, 102, 103], [201, 202, 203, 204, 205], [301]]
    kw = dict(n_samples_per_prompt=3, max_new_tokens=12, temperature=1.0, top_p=0.95)
    samples = engine.generate(prompts, seed=1, **kw)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    reasons = {s.finish_reason for s in samples}
    assert reasons == {"stop", "length"}
    for s in samples:
        assert s.prompt_ids == prompts[s.prompt_index]
        assert len(s.logprobs) == len(s.response_ids) >= 1
        assert all(lp <= 0 and np.isfinite(lp) for lp in s.logprobs)
        body = s.response_ids[:-1] if s.finish_reason == "stop" else s.response_ids
        assert not stop & set(body)
        if s.finish_reason == "stop":
            assert s.response_ids[-1] in stop
        else:
            assert len(s.response_ids) == 12
    again = engine.generate(prompts, seed=1, **kw)
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]
    other = engine.generate(prompts, seed=2, **kw)
    assert [s.response_ids for s in other] != [s.response_ids for s in samples]
    # sampling log-probs are those of the model at temperature 1, top_p 1
    plain = engine.generate(prompts[:1], seed=3, n_samples_per_prompt=1, max_new_tokens=4,
                            temperature=1.0, top_p=1.0)[0]
    ids = torch.tensor([plain.prompt_ids + plain.response_ids])
    with torch.no_grad():
        lp = torch.log_softmax(engine.model(ids).logits[0].float(), -1)
    p = len(plain.prompt_ids)
    ref = [float(lp[p - 1 + j, t]) for j, t in enumerate(plain.response_ids)]
    np.testing.assert_allclose(plain.logprobs, ref, atol=1e-4)


def test_truncated_sample_has_no_eos_and_mask_covers_the_sampled_tokens():
    trunc = Sample(0, [11, 12, 13], [21, 22, 23, 24], "length")
    stop = Sample(1, [11, 12], [31, 2], "stop")
    tokens, mask = sample_arrays(trunc)
    assert tokens == [11, 12, 13, 21, 22, 23, 24] and mask == [0, 0, 0, 1, 1, 1, 1]
    assert 2 not in tokens  # no EOS appended to a truncated response
    assert sample_arrays(stop) == ([11, 12, 31, 2], [0, 0, 1, 1])
    split = rollout_split(["a", "b"], [trunc, stop])
    assert split.loss_tokens.tolist() == [4, 2]
    req = teacher_requests([trunc], [[7, 8, 11, 12, 13]])[0]
    assert req.tokens == [7, 8, 11, 12, 13, 21, 22, 23, 24] and req.positions == [4, 5, 6, 7]
    assert [req.tokens[p + 1] for p in req.positions] == trunc.response_ids
    assert req.keys == [2, 3, 4, 5] and req.pairs is None  # filed under the student's positions


def test_prompts_over_max_len_are_reported_not_cut(prepared):
    from kubedistill.train.on_policy_data import load_prompts

    prompts = load_prompts(prepared, "train", 32)
    assert len(prompts) == N_PROMPTS and prompts.skipped == ["train:long"]
    assert prompts.teacher_prompts[0][:3] == [7, 8, 9]


def test_ema_update_and_buckets():
    from kubedistill.rollout.sync import buckets, ema_update

    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    old = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student.state_dict(), 0.9)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * old[k] + 0.1 * student.state_dict()[k])
    state = {f"w{i}": torch.zeros(10) for i in range(5)}  # 40 bytes each
    got = list(buckets(state, bucket_bytes=100))
    assert [len(b) for b in got] == [2, 2, 1]
    assert [k for b in got for k, _ in b] == list(state)


# ---- the loop in-process (a world of one) ---------------------------------------------------
def _iterate(trainer, n: int, check) -> None:
    from kubedistill.train.trainer import _progress

    progress = _progress(trainer.total_steps, 0, False)
    trainer.sync()
    check(trainer)
    for _ in range(n):
        times: dict = {}
        split, teacher, stats = trainer.rollout(times)
        trainer.train_iteration(split, teacher, stats, progress, times)
        trainer.sync(times)
        trainer.end_iteration(stats, times)
        check(trainer)


def _assert_engine_holds_student(trainer) -> None:
    from kubedistill.train.fsdp import full_state_dict

    student = full_state_dict(trainer.module.student)
    engine = trainer.rollout_engine.state_dict()
    assert student.keys() <= engine.keys()
    for k, v in student.items():
        assert torch.equal(engine[k], v), k


def test_in_process_sync_keeps_the_engine_equal_to_the_student(world_of_one, base, tmp_path):
    from kubedistill.train.on_policy import OnPolicyTrainer

    trainer = OnPolicyTrainer(_config(tmp_path, "sync", base), world_of_one)
    first = {k: v.clone() for k, v in trainer.rollout_engine.state_dict().items()}
    _iterate(trainer, 2, _assert_engine_holds_student)
    assert trainer.cursor.global_step == 4 and trainer.cursor.iteration == 2
    changed = trainer.rollout_engine.state_dict()
    assert any(not torch.equal(first[k], changed[k]) for k in first)  # it did train


def test_resolve_self_distillation_by_equal_paths(tmp_path, caplog):
    import logging

    from kubedistill.train.self_distill import resolve_self_distillation

    model = tmp_path / "m"
    model.mkdir()
    for student, teacher, expect in ((str(model), str(model), True),
                                     (str(model), str(tmp_path / "m" / "."), True),
                                     (str(model), str(tmp_path), False),
                                     (str(model), None, False)):
        cfg = Config()
        cfg.model.student_name_or_path, cfg.model.teacher_name_or_path = student, teacher
        with caplog.at_level(logging.INFO, logger="kubedistill.train.self_distill"):
            caplog.clear()
            assert resolve_self_distillation(cfg) is expect
        assert cfg.kd.self_distillation is expect
        assert ("self-distillation" in caplog.text) is expect
    cfg = Config()
    cfg.kd.self_distillation = True  # the explicit flag keeps working without equal paths
    assert resolve_self_distillation(cfg) is True


def test_teacher_path_equal_to_student_path_is_self_distillation(world_of_one, base, tmp_path):
    from kubedistill.train.on_policy import OnPolicyTrainer

    cfg = _config(tmp_path, "same", base, teacher_name_or_path=base["student_name_or_path"])
    assert cfg.kd.self_distillation is False
    trainer = OnPolicyTrainer(cfg, world_of_one)
    assert trainer.self_distill and trainer.self_teacher is not None
    _iterate(trainer, 1, lambda tr: None)
    assert trainer.cursor.teacher_updates == 1  # teacher_update_freq 1: theta_T <- theta_S


def test_in_process_ema_self_distillation_teacher(world_of_one, base, tmp_path):
    from kubedistill.train.fsdp import full_state_dict
    from kubedistill.train.on_policy import OnPolicyTrainer

    decay = 0.75
    cfg = _config(tmp_path, "ema", base, self_distillation=True, use_ema_teacher=True,
                  teacher_ema_decay=decay, teacher_input_key="teacher")
    trainer = OnPolicyTrainer(cfg, world_of_one)
    history = []

    def check(tr):
        theta_t = {k: v.clone() for k, v in tr.self_teacher.model.state_dict().items()}
        history.append((theta_t, {k: v.clone() for k, v in  # a world of one shares storage
                                 full_state_dict(tr.module.student).items()}))
        head = tr.module.algorithm.inner.teacher_head.weight
        assert torch.equal(head, tr.self_teacher.model.get_output_embeddings().weight)

    _iterate(trainer, 2, check)
    assert trainer.cursor.teacher_updates == 2
    for (old_t, _), (new_t, student) in zip(history[:-1], history[1:], strict=True):
        for k in student:
            torch.testing.assert_close(new_t[k], decay * old_t[k] + (1 - decay) * student[k],
                                       atol=1e-6, rtol=0)
        assert any(not torch.equal(old_t[k], new_t[k]) for k in student)
    # the teacher saw the teacher prompt: [7, 8, 9] + the student prompt
    assert trainer.prompts.teacher_prompts[0][:3] == [7, 8, 9]


# ---- torchrun ------------------------------------------------------------------------------
def _log(cfg: Config) -> list[dict]:
    with open(os.path.join(cfg.storage.work_dir, "train", "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(cfg: Config) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(cfg.train.save_path, "model.safetensors"))


@pytest.fixture(scope="module")
def one_thread():
    env = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory, one_thread) -> Config:
    from kubedistill.train.launch import train

    cfg = _config(tmp_path_factory.mktemp("runs"), "straight", base)
    assert train(cfg) == cfg.train.save_path
    assert _summary(cfg)["world_size"] == 1  # torchrun with one worker, not this process
    return cfg


def _summary(cfg: Config) -> dict:
    with open(os.path.join(cfg.train.save_path, "train_summary.json")) as f:
        return json.load(f)


def test_torchrun_on_policy_run(straight):
    log = _log(straight)
    steps = [r for r in log if "train/loss" in r]
    iters = [r for r in log if "iteration" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in iters] == [1, 2, 3]
    # measured (seed 5): the random tiny student never samples a stop token among 49,152 ids
    # in 10 tokens, so every sample is truncated at generate_max_len; diagnostics KL
    # 0.031 / 0.020 / 0.035 and top-1 agreement 0.57 / 0.11 / 0.27 over the 3 iterations
    for r in iters:
        assert r["rollout/samples"] == 8 and r["rollout/prompts_over_max_len"] == 1
        assert r["rollout/truncation_rate"] == 1.0
        assert r["rollout/response_len"] == r["rollout/response_len_max"] == 10
        assert 0.01 < r["onpolicy/kl"] < 0.05 and 0.05 < r["onpolicy/top1_agree"] < 0.7
        assert all(r[f"time/{p}_s"] >= 0 for p in ("rollout", "teacher", "train", "sync"))
    for r in steps:  # kd_ratio 1: the loss is the KD term alone
        assert r["train/loss"] == pytest.approx(r["train/kd"], rel=1e-5)
        assert r["train/ce"] > 0  # logged, weight 0
    summary = _summary(straight)
    assert summary["steps"] == 6 and summary["samples"] == 24
    with open(os.path.join(straight.storage.work_dir, "train", "rollout_samples.jsonl")) as f:
        table = [json.loads(line) for line in f]
    assert len(table) == 3 and {"prompt", "response", "finish_reason"} <= set(table[0])  # 1 a rollout


def test_killed_run_resumes_from_the_right_iteration(straight, base, tmp_path, one_thread):
    from kubedistill.train.launch import train

    cfg = _config(tmp_path, "killed", base)
    saved_step = kill_at_first_checkpoint(cfg)
    assert saved_step == 2  # save_steps=2: killed as soon as the first checkpoint committed
    before = len(_log(cfg))

    cfg.train.resume = True
    train(cfg)
    resumed = _log(cfg)[before:]
    first_iter = next(r["iteration"] for r in resumed if "iteration" in r)
    assert first_iter == saved_step // 2 + 1  # 2 steps per iteration
    assert [r["step"] for r in resumed if "train/loss" in r][0] == saved_step + 1
    a, b = _weights(cfg), _weights(straight)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    straight_steps = {r["step"]: r["train/loss"] for r in _log(straight) if "train/loss" in r}
    for r in resumed:
        if "train/loss" in r:
            assert r["train/loss"] == pytest.approx(straight_steps[r["step"]], abs=1e-6)


def test_two_ranks_follow_the_one_rank_run(straight, base, tmp_path, one_thread):
    """Rank 0 rolls out and scores; both ranks train on their share of each step with the
    global loss-token normaliser: the same losses and weights as one rank."""
    from kubedistill.train.launch import train

    cfg = _config(tmp_path, "two", base, num_gpus_per_node=2, micro_train_batch_size=1)
    train(cfg)
    assert _summary(cfg)["world_size"] == 2 and _summary(straight)["world_size"] == 1
    one = {r["step"]: r for r in _log(straight) if "train/loss" in r}
    two = [r for r in _log(cfg) if "train/loss" in r]
    assert [r["step"] for r in two] == sorted(one)
    for r in two:  # the same rollouts (token counts), the same losses up to fp32 rounding
        assert r["train/loss_tokens"] == one[r["step"]]["train/loss_tokens"]
        assert r["train/loss"] == pytest.approx(one[r["step"]]["train/loss"], abs=1e-4)
        assert r["train/grad_norm"] == pytest.approx(one[r["step"]]["train/grad_norm"],
                                                     rel=2e-3)
    a, b = _weights(cfg), _weights(straight)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3  # Adam: lr-scale


def test_self_distillation_run_saves_and_resumes_its_teacher(base, tmp_path, one_thread):
    """Self-distillation with a copy every 2 iterations; theta_T is checkpointed beside
    the student (pruned with it) and a resumed run loads it."""
    from safetensors.torch import load_file

    from kubedistill.train.launch import train

    cfg = _config(tmp_path, "self", base, self_distillation=True, teacher_update_freq=2,
                  teacher_name_or_path=None)
    train(cfg)
    iters = [r for r in _log(cfg) if "iteration" in r]
    assert [r["rollout/teacher_updates"] for r in iters] == [0, 1, 1]
    files = sorted(f for f in os.listdir(cfg.train.ckpt_path) if f.startswith("teacher_"))
    assert files == ["teacher_step_00000004.safetensors", "teacher_step_00000006.safetensors"]
    theta_t = load_file(os.path.join(cfg.train.ckpt_path, files[-1]))
    # the copy at iteration 2 (step 4) is the student of step 4, not the final one
    final = _weights(cfg)
    assert any(not torch.equal(theta_t[k], final[k]) for k in final if k in theta_t)
    cfg.train.resume = True
    train(cfg)  # nothing left to train: loads the checkpoint and theta_T, exports again
    torch.testing.assert_close(_weights(cfg), final, atol=0, rtol=0)


def test_on_policy_refuses_what_it_cannot_honour(base, tmp_path):
    from kubedistill.errors import ConfigError
    from kubedistill.train.on_policy import check_config
    from kubedistill.train.trainer import Trainer
    from kubedistill.train.worker import trainer_class

    assert trainer_class(_config(tmp_path, "off", base, rollout_num_engines=0)) is Trainer
    check_config(_config(tmp_path, "ok", base))
    for over, match in (({"kd_algorithm": "sft"}, "needs a teacher signal"),
                        ({"kd_ratio": 0.0}, "needs a teacher signal"),
                        ({"n_samples_per_prompt": 0}, "n_samples_per_prompt")):
        with pytest.raises(ConfigError, match=match):
            check_config(_config(tmp_path, "bad", base, **over))


def test_sglang_outputs_become_samples_without_a_gpu():
    """The SGLang glue on recorded-shape outputs: requests send token ids (each prompt n
    times, a seed per sample), outputs keep the sampled ids, a stop token SGLang left out
    is put back, and weight buckets go through update_weights_from_tensor."""
    from kubedistill.rollout.sglang import SGLangRolloutEngine, engine_kwargs, parse_output

    def out(ids, kind, matched=None):
        return {"output_ids": ids, "meta_info": {
            "finish_reason": {"type": kind, **({"matched": matched} if matched else {})},
            "output_token_logprobs": [(-0.5, t, None) for t in ids]}}

    s = parse_output(out([5, 6, 2], "stop", 2), 0, [1, 2], {2}, 8)
    assert (s.response_ids, s.finish_reason, s.logprobs) == ([5, 6, 2], "stop", [-0.5] * 3)
    s = parse_output(out([5, 6], "stop", 2), 0, [1], {2}, 8)  # stop token trimmed
    assert s.response_ids == [5, 6, 2] and np.isnan(s.logprobs[-1])
    s = parse_output(out([5, 6, 7], "length"), 1, [1], {2}, 3)
    assert (s.response_ids, s.finish_reason, s.prompt_index) == ([5, 6, 7], "length", 1)
    with pytest.raises(Exception, match="abort"):
        parse_output(out([5], "abort"), 0, [1], {2}, 3)

    class FakeEngine:
        def __init__(self):
            self.calls = []

        def generate(self, **kw):
            self.calls.append(kw)
            return [out([9, 2], "stop", 2) for _ in kw["input_ids"]]

        def update_weights_from_tensor(self, named_tensors, flush_cache=True):
            self.calls.append(named_tensors)

    fake = FakeEngine()
    engine = SGLangRolloutEngine(fake, {2})
    samples = engine.generate([[1, 2, 3], [4]], n_samples_per_prompt=2, max_new_tokens=4,
                              temperature=0.7, top_p=0.9, seed=3)
    req = fake.calls[0]
    assert req["input_ids"] == [[1, 2, 3], [1, 2, 3], [4], [4]] and req["return_logprob"]
    assert {p["temperature"] for p in req["sampling_params"]} == {0.7}
    assert len({p["sampling_seed"] for p in req["sampling_params"]}) == 4
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    engine.load_weights([("w", torch.ones(2))])
    assert fake.calls[1][0][0] == "w"
    cfg = Config()
    cfg.set("enable_sleep", True)
    kw = engine_kwargs(cfg, "/m")
    assert kw["skip_tokenizer_init"] and kw["enable_memory_saver"]
