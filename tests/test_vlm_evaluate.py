"""The evaluate stage on image rows, both tiny VLM families (Idefics3, Qwen2-VL):

- CE of the student on image rows equals a hand computation from the HF model's own forward
  with the pixels and its own positions (fp32, 1e-5), and differs without the pixels;
- KL(teacher || student) is 0 and top-1 agreement 1.0 when the teacher IS the student (live
  signal with the teacher's own processor);
- greedy generation with pixels starts with the argmax of the model's own forward;
- the whole stage writes the image metrics (counts, KL, top-1, the generation metric, the
  teacher baseline) into metrics.json.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from _vlm_prepared import vlm_rows, write_vlm_prepared
from test_evaluate_stage import make_cfg

from kubedistill.data.images import decode_stored
from kubedistill.evaluate.scoring import TokenStats, make_batches, target_hidden
from kubedistill.evaluate.teacher_signal import LiveSignal
from kubedistill.evaluate.vision import EvalImages
from kubedistill.models.tiny_vlm import FAMILIES, build_tiny_vlm, load_vlm
from kubedistill.teacher.head import TeacherHead
from kubedistill.vlm.inputs import VLMSample, collate, forward_kwargs


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    path = build_tiny_vlm(str(tmp_path_factory.mktemp(request.param) / "m"), request.param)
    return path, load_vlm(path)


def own_forward_ce(model, images: EvalImages, rows: list[dict], with_pixels: bool = True
                   ) -> float:
    """Mean CE over all targets, one row at a time through ``model(...)`` itself (without
    pixels: tokens and mask only, so image tokens are plain embeddings)."""
    total, n = 0.0, 0
    for row in rows:
        pixels = images.processor.pixels(decode_stored(row["images"], where="t")) \
            if row["images"] else {}
        batch = collate([VLMSample(row["input_ids"], row["loss_mask"], row["prompt_len"],
                                   pixels)], images.processor)
        kwargs = forward_kwargs(model, batch) if with_pixels else {
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = model(**kwargs).logits[0]
        ids = torch.as_tensor(row["input_ids"])
        t = torch.as_tensor(row["loss_mask"]).nonzero().flatten()
        total += float(F.cross_entropy(logits[t - 1], ids[t], reduction="sum"))
        n += len(t)
    return total / n


@torch.inference_mode()
def test_image_row_scores(vlm):
    path, model = vlm
    rows = vlm_rows(path, 6, "eval")
    assert sum(bool(r["images"]) for r in rows) == 4  # text rows and 1- and 2-image rows
    images = EvalImages.for_model(path, rows)
    signal = LiveSignal(model, "cpu", None, images)
    head, stats = TeacherHead.from_model(model), TokenStats()
    for batch in make_batches([r["input_ids"] for r in rows], [r["loss_mask"] for r in rows],
                              4096):
        assert len(batch.rows) == 6  # one padded batch: pixels of rows with 0, 1, 2 images
        hidden, targets, brow = target_hidden(model, batch, "cpu", images)
        t_logits, keep = signal.logits(batch, rows, brow)
        stats.add(head, hidden, targets, brow, t_logits, keep)
    m = stats.means()
    assert m["eval_ce"] == pytest.approx(own_forward_ce(model, images, rows), abs=1e-5)
    assert abs(m["eval_ce"] - own_forward_ce(model, images, rows, with_pixels=False)) > 1e-4
    assert m["eval_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval_top1_agreement"] == 1.0
    assert m["eval_kl_tokens"] == m["eval_tokens"] == sum(sum(r["loss_mask"]) for r in rows)


@torch.inference_mode()
def test_generation_with_pixels(vlm):
    path, model = vlm
    rows = [r for r in vlm_rows(path, 6, "eval") if r["images"]]
    images = EvalImages.for_model(path, rows)
    prompts = [r["input_ids"][:r["prompt_len"]] for r in rows]
    out = images.generate_ids(model, prompts, list(range(len(rows))), max_new_tokens=3,
                              batch_size=4)
    assert len(out) == len(rows) and all(out)
    for r in range(len(rows)):
        prompt = VLMSample(prompts[r], [0] * len(prompts[r]), len(prompts[r]),
                           images.pixels(r))
        logits = model(**forward_kwargs(model, collate([prompt], images.processor))).logits
        assert out[r][0] == int(logits[0, -1].argmax())


def test_text_model_refuses_image_rows(tmp_path):
    from kubedistill.errors import DataError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert EvalImages.for_model(str(tmp_path), [{"id": "eval:0", "images": None}]) is None
    with pytest.raises(DataError, match="'eval:1'.*not an image-text model"):
        EvalImages.for_model(str(tmp_path), [{"id": "eval:1", "images": [b"x"]}])


def test_evaluate_stage_image_metrics(vlm, tmp_path):
    from kubedistill.evaluate.stage import evaluate

    path, _ = vlm
    prepared = write_vlm_prepared(str(tmp_path / "prepared"), path, {"train": 2, "eval": 6})
    cfg = make_cfg(tmp_path / "work", prepared, path, teacher=path, n_gen=3, max_new=4,
                   eval_task="rouge", eval_metric="eval_rouge_l")
    metrics = evaluate(cfg)
    on_disk = json.loads((tmp_path / "work" / "eval" / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["eval_image_samples"] == 4 and metrics["eval_images"] == 6
    assert metrics["eval_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_top1_agreement"] == 1.0 and metrics["teacher_signal"] == "live"
    assert metrics["teacher_eval_ce"] == pytest.approx(metrics["eval_ce"], abs=1e-6)
    assert metrics["eval_generations"] == 3 and 0.0 <= metrics["eval_rouge_l"] <= 1.0
    assert metrics["teacher_eval_rouge_l"] == metrics["eval_rouge_l"]
    table = [json.loads(x) for x in open(os.path.join(tmp_path, "work", "eval",
                                                      "generations.jsonl"))]
    assert [t["images"] for t in table] == [0, 1, 2]
    assert all(t["student_output"] == t["teacher_output"] for t in table)
