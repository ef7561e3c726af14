"""The train stage for real: torchrun on CPU (gloo), tiny Llama student + tiny teacher with
the SmolLM2 tokenizer, vanilla KD from a real teacher cache.

- 2 ranks follow the 1-rank loss curve (and end at the same weights); so do packed and
  dynamic batches (with HSDP and gradient checkpointing switched on in those runs);
- the first step matches a plain single-process PyTorch computation of the same loss;
- N = 21 samples with a global batch of 4: every sample and loss token is trained on;
- a run SIGKILLed after its step-2 checkpoint and resumed ends with the same weights;
- the final HF directory loads and generates; LoRA (2 ranks, on a student derived from
  teacher layers) saves adapters, and its merged export == base + adapters.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _procs import kill_at_first_checkpoint
from _runs import Runs, losses, reproducible_cpu
from safetensors.torch import load_file

from kubedistill.config import Config
from kubedistill.train.launch import train

N_TRAIN, N_EVAL, GBS = 21, 5, 4
STEPS = -(-N_TRAIN // GBS)  # 6; the last step holds 1 sample: one of 2 ranks has none


def _rows(n: int, seed: int, split: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(10, 48))
        prompt = int(rng.integers(3, length - 3))
        ids = rng.integers(100, 400, length).tolist()  # learnable: few distinct tokens
        rows.append({"id": f"{split}:{i}", "input_ids": ids, "prompt_len": prompt,
                     "loss_mask": [0] * prompt + [1] * (length - prompt), "response": ""})
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from _prepared import write_splits

    return write_splits(str(tmp_path_factory.mktemp("prepared")), {
        split: _rows(n, seed, split) for split, n, seed in (("train", N_TRAIN, 0),
                                                            ("eval", N_EVAL, 1))})


@pytest.fixture(scope="module")
def teacher_cache(prepared, tiny_teacher_dir, tmp_path_factory) -> str:
    from kubedistill.teacher.cache import cache_teacher

    cfg = Config()
    path = str(tmp_path_factory.mktemp("cache") / "teacher_cache")
    for k, v in dict(teacher_name_or_path=tiny_teacher_dir, prepared_path=prepared,
                     teacher_cache_path=path, teacher_backend="hf", cache_dtype="fp32",
                     work_dir=str(tmp_path_factory.mktemp("cache_wd"))).items():
        cfg.set(k, v)
    cache_teacher(cfg)
    return path




def outputs(cfg: Config) -> dict:
    wd = cfg.storage.work_dir
    with open(os.path.join(wd, "train", "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    save = cfg.train.save_path
    with open(os.path.join(save, "train_summary.json")) as f:
        summary = json.load(f)
    weights = os.path.join(save, "model.safetensors")
    return {"cfg": cfg, "train": [r for r in log if "train/loss" in r],
            "eval": [r for r in log if "eval/loss" in r], "summary": summary,
            "weights": load_file(weights) if os.path.exists(weights) else None}


pytestmark = pytest.mark.timeout(900)  # the module's runs start in its first tests


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_teacher_dir, prepared, teacher_cache, tmp_path_factory):
    base = dict(student_name_or_path=tiny_model_dir, teacher_name_or_path=tiny_teacher_dir,
                prepared_path=prepared, teacher_cache_path=teacher_cache,
                kd_algorithm="vanilla_kd", kd_ratio=0.5, kd_loss_fn="kl", cache_dtype="fp32",
                num_gpus_per_node=2, train_batch_size=GBS, micro_train_batch_size=1,
                learning_rate=2e-3, lr_warmup_ratio=0.0, min_lr=1e-4, weight_decay=0.01,
                max_norm=1.0, num_epochs=1, eval_steps=3, save_steps=2, logging_steps=1,
                chunked_loss_size=16, seed=3, tracking_uri="off", device="cpu")
    with reproducible_cpu():
        yield Runs(base, tmp_path_factory.mktemp("runs"), outputs)



def assert_same_curve(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert len(a["train"]) == len(b["train"]) == STEPS
    for key in ("train/loss", "train/ce", "train/kd", "train/grad_norm"):
        np.testing.assert_allclose(losses(a, key), losses(b, key), atol=tol, rtol=0, err_msg=key)
    np.testing.assert_allclose([r["eval/loss"] for r in a["eval"]],
                               [r["eval/loss"] for r in b["eval"]], atol=tol, rtol=0)


def max_weight_diff(a: dict, b: dict) -> float:
    assert a["weights"].keys() == b["weights"].keys()
    return max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"])


def test_two_ranks_follow_the_one_rank_curve(runs):
    one, two = runs.get("one", num_gpus_per_node=1), runs.get("two")
    assert one["summary"]["world_size"] == 1 and two["summary"]["world_size"] == 2
    assert_same_curve(one, two)
    assert losses(two)[-1] < losses(two)[0] and two["eval"][-1]["eval/loss"] < two["eval"][0][
        "eval/loss"]
    assert max_weight_diff(one, two) < 1e-4


def test_packed_batches_follow_the_unpacked_curve(runs):
    # one micro-batch of 2 packed samples per rank, on an HSDP mesh (replicate 2 x shard 1)
    packed = runs.get("packed", packing_samples=True, micro_train_batch_size=2, fsdp_size=1)
    assert_same_curve(runs.get("two"), packed)


def test_dynamic_batches_follow_the_fixed_curve(runs):
    dynamic = runs.get("dynamic", use_dynamic_bsz=True, max_token_len_per_gpu=64,
                       gradient_checkpointing=True)
    assert_same_curve(runs.get("two"), dynamic)


def test_every_sample_and_loss_token_is_trained_on(runs, prepared):
    from kubedistill.train.data import load_prepared

    split = load_prepared(prepared, "train")
    two = runs.get("two")
    summary = two["summary"]
    assert summary["steps"] == STEPS and summary["samples"] == N_TRAIN
    assert summary["loss_tokens"] == int(split.loss_tokens.sum())
    assert sum(r["train/samples"] for r in two["train"]) == N_TRAIN
    assert two["train"][-1]["train/samples"] == 1  # the remainder step, not dropped
    assert summary["final_eval"]["eval/samples"] == N_EVAL


def test_first_step_matches_a_plain_pytorch_step(runs, prepared, teacher_cache):
    """No FSDP, no torchrun: the same samples, loss and normaliser by hand."""
    from transformers import AutoModelForCausalLM

    from kubedistill.algorithms import build_algorithm
    from kubedistill.teacher.reader import TeacherCache
    from kubedistill.train import data

    one = runs.get("one", num_gpus_per_node=1)
    cfg = one["cfg"]
    split = data.load_prepared(prepared, "train")
    cache = TeacherCache(teacher_cache)
    order = data.epoch_order(len(split), cfg.train.seed, 0)
    plan = data.plan_step(order, 0, 0, split.lengths, 1, batch_size=GBS, micro_bsz=GBS)
    batch = data.BatchBuilder(split, pad_id=0, packing=False, teacher=cache).build(
        plan.micro[0][0][0])
    model = AutoModelForCausalLM.from_pretrained(cfg.model.student_name_or_path,
                                                 attn_implementation="sdpa")
    algo = build_algorithm(cfg, cache.head(), model.config.hidden_size)
    h = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False).last_hidden_state
    out = algo(batch, h.reshape(-1, h.shape[-1])[batch.loss_index],
               model.lm_head.weight, float(batch.num_loss_tokens))
    out["loss"].backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                          if p.grad is not None])
    first = one["train"][0]
    assert first["train/loss"] == pytest.approx(out["loss"].item(), abs=1e-5)
    assert first["train/grad_norm"] == pytest.approx(float(norm), abs=1e-4)
    assert first["train/loss_tokens"] == batch.num_loss_tokens


def test_sigkilled_run_resumes_to_the_same_weights(runs):
    cfg = runs.config("killed")
    assert kill_at_first_checkpoint(cfg) == 2
    assert not os.path.exists(os.path.join(cfg.train.save_path, "train_summary.json"))

    cfg.train.resume = True
    train(cfg)
    resumed, straight = outputs(cfg), runs.get("two")
    assert max_weight_diff(resumed, straight) < 1e-6
    assert resumed["summary"]["steps"] == STEPS
    assert resumed["summary"]["samples"] == N_TRAIN
    assert resumed["summary"]["loss_tokens"] == straight["summary"]["loss_tokens"]
    np.testing.assert_allclose(losses(resumed)[-STEPS + 2:], losses(straight)[2:], atol=1e-6)


def test_run_killed_on_two_ranks_resumes_on_one(runs):
    """The sharded checkpoint of a 2-rank run loads into 1 rank: the resumed steps and the
    final weights follow the uninterrupted 1-rank run (same tolerance as 1 vs 2 ranks)."""
    cfg = runs.config("two_then_one")
    assert kill_at_first_checkpoint(cfg) == 2
    cfg.train.num_gpus_per_node, cfg.train.resume = 1, True
    train(cfg)
    resumed, one = outputs(cfg), runs.get("one", num_gpus_per_node=1)
    assert resumed["summary"]["world_size"] == 1
    assert resumed["summary"]["steps"] == STEPS and resumed["summary"]["samples"] == N_TRAIN
    assert resumed["summary"]["loss_tokens"] == one["summary"]["loss_tokens"]
    assert [r["step"] for r in resumed["train"]] == [1, 2, *range(3, STEPS + 1)]
    np.testing.assert_allclose(losses(resumed)[2:], losses(one)[2:], atol=1e-4, rtol=0)
    assert max_weight_diff(resumed, one) < 1e-4


def test_two_epochs_train_every_sample_twice_in_a_new_order(runs, prepared):
    from kubedistill.train.data import load_prepared

    split = load_prepared(prepared, "train")
    run = runs.get("epochs", num_gpus_per_node=1, num_epochs=2, eval_steps=-1, save_steps=-1)
    one = runs.get("one", num_gpus_per_node=1)
    summary = run["summary"]
    assert summary["steps"] == 2 * STEPS and summary["samples"] == 2 * N_TRAIN
    assert summary["loss_tokens"] == 2 * int(split.loss_tokens.sum())
    assert [r["train/samples"] for r in run["train"]] == [4, 4, 4, 4, 4, 1] * 2
    tokens = [r["train/loss_tokens"] for r in run["train"]]
    assert sum(tokens[:STEPS]) == sum(tokens[STEPS:]) and tokens[:STEPS] != tokens[STEPS:]
    # the first step is the one-epoch run's (same seed, init and first batch)
    assert run["train"][0]["train/loss"] == pytest.approx(one["train"][0]["train/loss"],
                                                         abs=1e-6)


def test_export_holds_the_trained_weights_not_the_initial_ones(runs, tiny_model_dir, tmp_path):
    """The exported safetensors equal the student of the last checkpoint (step 6, the end of
    training) tensor for tensor, and differ from the initial student in every tensor."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    two = runs.get("two")
    ckpt = two["cfg"].train.ckpt_path
    with open(os.path.join(ckpt, "latest.json")) as f:
        latest = json.load(f)
    assert latest["step"] == STEPS
    dcp_to_torch_save(os.path.join(ckpt, latest["dir"]), tmp_path / "final.pt")
    trained = torch.load(tmp_path / "final.pt", weights_only=True)["model"]
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    exported = two["weights"]
    assert exported.keys() == initial.keys()
    for k, v in exported.items():
        matches = [name for name in trained if name.endswith("." + k) or name == k]
        assert len(matches) == 1, (k, matches)
        assert torch.equal(v, trained[matches[0]]), k
        assert not torch.equal(v, initial[k]), k


def test_a_cache_built_from_other_data_is_refused(runs, teacher_cache, tmp_path):
    """A train stage handed a teacher cache of other prepared data: ArtifactMismatch naming
    the key part (``data``), before any step."""
    from _prepared import write_splits

    from kubedistill.errors import ArtifactMismatch
    from kubedistill.train.trainer import _open_teacher

    other = write_splits(str(tmp_path / "other_prepared"), {
        split: _rows(n, seed, split) for split, n, seed in (("train", N_TRAIN, 10),
                                                            ("eval", N_EVAL, 11))})
    cfg = runs.config("other_data", prepared_path=other)
    assert cfg.teacher_cache_path == teacher_cache
    with pytest.raises(ArtifactMismatch, match=r"differing key part\(s\): data: cache has"):
        _open_teacher(cfg)


def _generate(model_dir: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
    ids = tok("What is 2+2?", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
        logits = model(ids).logits
    assert gen.shape[1] == ids.shape[1] + 4
    return gen, logits


def test_final_model_loads_and_generates(runs):
    save = runs.get("two")["cfg"].train.save_path
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(save))
    _generate(save)


def test_lora_adapters_under_fsdp_and_merged_export(runs, tmp_path):
    """2-rank LoRA run on a student derived from teacher layers 0 and 2, saving adapters;
    the merged export of the same state equals base + adapters, loads as a plain model
    and generates."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubedistill.train.export import write_hf_model

    lora = dict(student_name_or_path=None, student_from_teacher_layers="0,2", lora_rank=4,
                lora_alpha=8)
    run = runs.get("lora", lora_save_adapters=True, learning_rate=1e-2, max_steps=2,
                   eval_steps=-1, save_steps=-1, **lora)
    adapters = run["cfg"].train.save_path
    files = set(os.listdir(adapters))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    student = os.path.join(run["cfg"].storage.work_dir, "student_init")
    base = AutoModelForCausalLM.from_pretrained(student)
    assert base.config.num_hidden_layers == 2 and base.config.hidden_size == 96
    with_adapters = PeftModel.from_pretrained(base, adapters).eval()

    merged = str(tmp_path / "merged")
    write_hf_model(with_adapters.state_dict(), student,
                   runs.config("lora", lora_save_adapters=False, **lora), merged)
    assert not os.path.exists(os.path.join(merged, "adapter_config.json"))
    gen, logits_merged = _generate(merged)
    ids = gen[:, :-4]
    with torch.no_grad():
        logits_adapters = with_adapters(ids).logits
        with with_adapters.disable_adapter():
            logits_base = with_adapters(ids).logits
    torch.testing.assert_close(logits_merged, logits_adapters, atol=1e-4, rtol=1e-4)
    assert (logits_merged - logits_base).abs().max() > 1e-3  # the adapters did train
