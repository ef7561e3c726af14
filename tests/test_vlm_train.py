"""Image-text students in the trainer, in this process (both tiny families):

- the training forward (BatchBuilder + DistillModule) gives the HF model's own logits on the
  same samples, Qwen2-VL's 3-D M-RoPE positions included (fp32, 1e-5);
- dynamic micro-batches carry each sample's images exactly once;
- vanilla KD from teacher states on image inputs lowers the loss;
- freeze_vision_tower: a trainer run (world of one, FSDP2) leaves the vision weights as they
  were, changes the LM's, checkpoints and resumes, and its export reloads with
  AutoModelForImageTextToText + load_processor;
- a student derived from a VLM teacher drops LM layers only;
- LoRA adapters go on the language model only; packing with images is refused.
(torchrun runs: tests/test_vlm_train_runs.py.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _vlm_prepared import write_vlm_prepared

from kubedistill.algorithms.base import Algorithm
from kubedistill.config import Config
from kubedistill.errors import ConfigError
from kubedistill.models.tiny_vlm import build_tiny_vlm, load_vlm
from kubedistill.train import data
from kubedistill.train.student import DistillModule
from kubedistill.train.vision import image_batcher
from kubedistill.vlm.processing import load_processor

FAMILIES = ("idefics3", "qwen2_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, student dir, prepared dir with 9 train / 3 eval rows)."""
    root = tmp_path_factory.mktemp(request.param)
    student = build_tiny_vlm(str(root / "student"), request.param)
    prepared = write_vlm_prepared(str(root / "prepared"), student, {"train": 9, "eval": 3})
    return request.param, student, prepared


class Capture(Algorithm):
    """Keeps the logits at the loss positions; a zero loss."""

    needs_teacher = False

    def forward(self, batch, hidden, lm_head_weight, normalizer):
        self.logits = hidden @ lm_head_weight.T
        return {"loss": self.logits.sum() * 0.0}


def _builder(split, model, student_dir, **kw):
    return data.BatchBuilder(split, pad_id=model.config.get_text_config().pad_token_id,
                             packing=False, images=image_batcher(model, student_dir), **kw)


def test_training_forward_equals_the_hf_forward(family):
    name, student, prepared = family
    model, processor = load_vlm(student), load_processor(student)
    split = data.load_prepared(prepared, "train")
    assert split.images is not None and [bool(x) for x in split.images[:3]] == [0, 1, 1]
    batch = _builder(split, model, student).build([0, 1, 2, 5])  # 0, 1, 2 and 2 images
    if name == "qwen2_vl":
        assert batch.position_ids.shape == (3, *batch.input_ids.shape)
        image = batch.vision_inputs["mm_token_type_ids"].bool()
        assert (batch.position_ids[1][image] != batch.position_ids[2][image]).any()
    module = DistillModule(model, Capture(Config()))
    with torch.no_grad():
        module(batch, 1.0)
    from kubedistill.data.images import decode_stored

    expected = []
    for i in (0, 1, 2, 5):
        tokens, mask = split.sample(i)
        inputs = {"input_ids": torch.from_numpy(tokens)[None],
                  "attention_mask": torch.ones(1, len(tokens), dtype=torch.long),
                  "mm_token_type_ids": torch.from_numpy(
                      (tokens == processor.image_token_id).astype(np.int64))[None],
                  **processor.collate([processor.pixels(decode_stored(split.images[i],
                                                                      where="t"))])}
        if name == "idefics3":
            inputs.pop("mm_token_type_ids")
        with torch.no_grad():
            logits = model(**inputs).logits[0]  # the model computes its own positions
        pos = np.nonzero(mask[1:])[0]
        expected.append(logits[torch.from_numpy(pos)])
    torch.testing.assert_close(module.algorithm.logits, torch.cat(expected), atol=1e-5, rtol=0)


def test_dynamic_micro_batches_carry_each_image_once(family):
    name, student, prepared = family
    model, processor = load_vlm(student), load_processor(student)
    split = data.load_prepared(prepared, "train")
    builder = _builder(split, model, student)
    order = data.epoch_order(len(split), 0, 0)
    plan = data.plan_step(order, 0, 0, split.lengths, 2, batch_size=9, micro_bsz=1,
                          max_tokens=int(split.lengths.max()) * 2)
    seen = []
    for rank in plan.micro:
        for indices, weight in rank:
            if not weight:
                continue
            batch = builder.build(indices)
            n_images = sum(len(split.images[i] or ()) for i in indices)
            v = batch.vision_inputs
            if name == "qwen2_vl":
                expected = [processor.pixels(_decode(split, i)) for i in indices
                            if split.images[i]]
                assert (v.get("image_grid_thw", torch.zeros(0, 3)).shape[0]) == n_images
                if n_images:
                    assert torch.equal(v["pixel_values"],
                                       torch.cat([e["pixel_values"] for e in expected]))
            elif n_images:
                real = v["pixel_values"].flatten(2).abs().sum(-1) > 0  # [B, max_images]
                assert real.sum(-1).tolist() == [len(split.images[i] or ()) for i in indices]
            seen += indices
    assert sorted(seen) == list(range(9)) and len(plan.micro[0]) > 1


def _decode(split, i):
    from kubedistill.data.images import decode_stored

    return decode_stored(split.images[i], where=f"sample {i}")


def test_packing_with_images_is_refused(family):
    _, student, prepared = family
    split = data.load_prepared(prepared, "train")
    with pytest.raises(ConfigError, match="packing_samples"):
        data.BatchBuilder(split, pad_id=0, packing=True, images=object())
    with pytest.raises(ConfigError, match="not an image-text model"):
        data.BatchBuilder(split, pad_id=0, packing=False)


def test_vanilla_kd_on_image_inputs_lowers_the_loss(family, tmp_path):
    from kubedistill.algorithms import build_algorithm
    from kubedistill.teacher.head import TeacherHead
    from kubedistill.teacher.vlm_states import image_text_final_states

    name, student, prepared = family
    teacher = load_vlm(build_tiny_vlm(str(tmp_path / "teacher"), name, seed=1))
    model = load_vlm(student).train()
    split = data.load_prepared(prepared, "train")
    batch = _builder(split, model, student).build(list(range(6)))
    rows = [np.nonzero(split.sample(i)[1][1:])[0].tolist() for i in range(6)]
    states = image_text_final_states(teacher, {
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
        **batch.vision_inputs}, rows)
    batch.teacher_hidden = torch.cat(states)
    cfg = Config()
    for k, v in dict(kd_algorithm="vanilla_kd", kd_ratio=1.0, kd_loss_fn="kl").items():
        cfg.set(k, v)
    module = DistillModule(model, build_algorithm(cfg, TeacherHead.from_model(teacher), 64))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(4):
        loss = module(batch, float(batch.num_loss_tokens))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.9, losses


def _split_params(state: dict) -> tuple[dict, dict]:
    vision = {k: v for k, v in state.items()
              if any(p in k for p in ("vision_model", "visual", "connector"))}
    return vision, {k: v for k, v in state.items() if k not in vision}


def test_freeze_vision_tower_trains_only_the_language_model(family, tmp_path, world_of_one):
    from transformers import AutoModelForImageTextToText

    from kubedistill.train.trainer import Trainer

    name, student, prepared = family
    cfg = Config()
    for k, v in dict(student_name_or_path=student, prepared_path=prepared, kd_algorithm="sft",
                     kd_ratio=0.0, freeze_vision_tower=True, train_batch_size=4,
                     micro_train_batch_size=2, learning_rate=1e-2, lr_warmup_ratio=0.0,
                     max_steps=2, save_steps=1, eval_steps=-1, num_gpus_per_node=1,
                     work_dir=str(tmp_path / "wd"), save_path=str(tmp_path / "model"),
                     ckpt_path=str(tmp_path / "ckpt"), tracking_uri="off",
                     device="cpu").items():
        cfg.set(k, v)
    trainer = Trainer(cfg, world_of_one)
    frozen = [n for n, p in trainer.module.named_parameters() if not p.requires_grad]
    assert frozen and all(any(s in n for s in ("vision_model", "visual", "connector"))
                          for n in frozen)
    trainer.fit()
    # the export reloads as an image-text model with its processor
    reloaded = AutoModelForImageTextToText.from_pretrained(cfg.train.save_path)
    assert type(reloaded).__name__ == type(load_vlm(student)).__name__
    final = reloaded.state_dict()
    v0, lm0 = _split_params(load_vlm(student).state_dict())
    v1, lm1 = _split_params(final)
    assert v0 and v0.keys() == v1.keys()
    assert all(torch.equal(v0[k], v1[k]) for k in v0)
    assert max(float((lm0[k] - lm1[k]).abs().max()) for k in lm0) > 1e-3
    assert load_processor(cfg.train.save_path).config() == load_processor(student).config()
    # the checkpoint (frozen tower: no optimizer state for it) resumes
    with open(os.path.join(cfg.train.ckpt_path, "latest.json")) as f:
        assert json.load(f)["step"] == 2
    cfg.train.resume, cfg.train.max_steps = True, 3
    resumed = Trainer(cfg, world_of_one)
    resumed.resume()
    assert resumed.cursor.global_step == 2
    got = {k.removeprefix("student."): v for k, v in resumed.module.state_dict().items()}
    assert all(torch.equal(got[k].full_tensor() if hasattr(got[k], "full_tensor") else got[k],
                           final[k]) for k in final)


def test_derived_student_drops_lm_layers_and_keeps_the_vision_tower(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from kubedistill.models.derive import derive_student

    name, teacher_dir, _ = family
    out = derive_student(teacher_dir, "1", str(tmp_path / "derived"))
    teacher, derived = load_vlm(teacher_dir), AutoModelForImageTextToText.from_pretrained(out)
    assert derived.config.get_text_config().num_hidden_layers == 1
    t, s = teacher.state_dict(), derived.state_dict()
    vision, rest = _split_params(s)
    assert vision and all(torch.equal(v, t[k]) for k, v in vision.items())
    layer = ".layers."
    for k, v in rest.items():
        if layer in k and not any(p in k for p in ("vision", "visual")):
            head, tail = k.split(layer)
            assert tail.startswith("0.")
            assert torch.equal(v, t[f"{head}{layer}1.{tail[2:]}"])
        else:
            assert torch.equal(v, t[k]), k
    assert load_processor(out).config() == load_processor(teacher_dir).config()


def test_lora_targets_the_language_model_only(family):
    from kubedistill.config import ModelConfig
    from kubedistill.train.lora import apply_lora

    _, student, _ = family
    model = apply_lora(load_vlm(student), ModelConfig(lora_rank=4))
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and not [n for n in lora if any(p in n for p in ("vision", "visual",
                                                                  "connector", "lm_head"))]
    with pytest.raises(ConfigError, match="names no linear layer"):
        apply_lora(load_vlm(student), ModelConfig(lora_rank=4, target_modules="nope"))
