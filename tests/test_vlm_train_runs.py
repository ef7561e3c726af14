"""The train stage with an image-text student, for real: torchrun on CPU (gloo), SFT on
prepared rows with images (text rows, 1- and 2-image rows mixed), both tiny families.

- 2 ranks follow the 1-rank loss curve and end at the same weights (FSDP2 shards every LM
  layer and every vision block; a rank whose micro-batch has no image still runs each
  vision block once, so the collectives line up), and the loss goes down;
- dynamic micro-batches (Qwen2-VL, 2 ranks) follow the fixed-size curve;
- a Qwen2-VL run SIGKILLed after its step-2 checkpoint resumes to the same final weights.
(Packing with images is refused at trainer start: tests/test_vlm_train.py.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _procs import kill_at_first_checkpoint
from _runs import Runs, losses, reproducible_cpu
from _vlm_prepared import write_vlm_prepared

from kubedistill.config import Config
from kubedistill.models.tiny_vlm import build_tiny_vlm
from kubedistill.train.launch import train

N_TRAIN, N_EVAL, GBS = 10, 3, 4
STEPS = -(-N_TRAIN // GBS)  # 3; the last step holds 2 samples

pytestmark = pytest.mark.timeout(900)




def outputs(cfg: Config) -> dict:
    from transformers import AutoModelForImageTextToText

    with open(os.path.join(cfg.storage.work_dir, "train", "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    with open(os.path.join(cfg.train.save_path, "train_summary.json")) as f:
        summary = json.load(f)
    model = AutoModelForImageTextToText.from_pretrained(cfg.train.save_path)
    return {"cfg": cfg, "train": [r for r in log if "train/loss" in r],
            "eval": [r for r in log if "eval/loss" in r], "summary": summary,
            "weights": model.state_dict()}


@pytest.fixture(scope="module", params=("qwen2_vl", "idefics3"))
def runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vlm_runs_{request.param}")
    student = build_tiny_vlm(str(root / "student"), request.param)
    prepared = write_vlm_prepared(str(root / "prepared"), student,
                                  {"train": N_TRAIN, "eval": N_EVAL})
    base = dict(student_name_or_path=student, prepared_path=prepared, kd_algorithm="sft",
                kd_ratio=0.0, num_gpus_per_node=2, train_batch_size=GBS,
                micro_train_batch_size=1, learning_rate=5e-3, lr_warmup_ratio=0.0,
                min_lr=1e-4, max_norm=1.0, num_epochs=1, eval_steps=2, save_steps=2,
                logging_steps=1, seed=3, tracking_uri="off", device="cpu")
    with reproducible_cpu():
        yield request.param, Runs(base, root / "runs", outputs)



def max_weight_diff(a: dict, b: dict) -> float:
    assert a["weights"].keys() == b["weights"].keys()
    return max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"])


def assert_same_curve(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert len(a["train"]) == len(b["train"]) == STEPS
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(losses(a, key), losses(b, key), atol=tol, rtol=0, err_msg=key)
    np.testing.assert_allclose([r["eval/loss"] for r in a["eval"]],
                               [r["eval/loss"] for r in b["eval"]], atol=tol, rtol=0)


def test_two_ranks_follow_the_one_rank_curve(runs):
    _, r = runs
    one, two = r.get("one", num_gpus_per_node=1), r.get("two")
    assert one["summary"]["world_size"] == 1 and two["summary"]["world_size"] == 2
    assert two["summary"]["samples"] == N_TRAIN
    assert_same_curve(one, two)
    assert two["eval"][-1]["eval/loss"] < two["eval"][0]["eval/loss"]
    assert losses(two)[-1] < losses(two)[0]
    assert max_weight_diff(one, two) < 1e-4


def test_dynamic_batches_follow_the_fixed_curve(runs):
    family, r = runs
    if family != "qwen2_vl":
        pytest.skip("one family is enough for the dynamic-batch run")
    dynamic = r.get("dynamic", use_dynamic_bsz=True, max_token_len_per_gpu=160)
    assert_same_curve(r.get("two"), dynamic)


def test_sigkilled_run_resumes_to_the_same_weights(runs):
    _, r = runs
    cfg = r.config("killed")
    assert kill_at_first_checkpoint(cfg) == 2
    assert not os.path.exists(os.path.join(cfg.train.save_path, "train_summary.json"))
    cfg.train.resume = True
    train(cfg)
    resumed, straight = outputs(cfg), r.get("two")
    assert resumed["summary"]["steps"] == STEPS and resumed["summary"]["samples"] == N_TRAIN
    assert max_weight_diff(resumed, straight) < 1e-6
    np.testing.assert_allclose(losses(resumed)[-1:], losses(straight)[-1:], atol=1e-6)
