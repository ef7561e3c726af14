"""``prepare`` with images, on both tiny VLM families: expanded tokens from each model's own
processor, ``images`` + ``image_sha256`` columns, the bad-image rows, the length policy, the
refusals, and parallel building giving the same bytes as one process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
from _vlm_data import CHINA, bad_rows, dataset, good_rows, vlm_cfg

from kubedistill.data import parallel
from kubedistill.data.image_rows import processor_hash
from kubedistill.data.images import decode_stored
from kubedistill.data.prepare import prepare
from kubedistill.data.prepared import content_hash, load_split, to_table
from kubedistill.errors import ConfigError
from kubedistill.models.tiny_vlm import build_tiny_vlm
from kubedistill.teacher.hf import implied_image_tokens
from kubedistill.vlm.processing import load_processor

FAMILIES = ("idefics3", "qwen2_vl")
LONG = {"messages": [{"role": "user", "content": "<image>Say a lot."},
                     {"role": "assistant", "content": "y" * 1100}], "image": "imgs/red.png"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {f: build_tiny_vlm(str(root / f), f) for f in FAMILIES}


def all_rows(cfg) -> list[dict]:
    return [r for s in ("train", "eval") for r in load_split(cfg.prepared_path, s).to_pylist()]


@pytest.mark.parametrize("family", FAMILIES)
def test_image_rows_bad_images_and_length(tmp_path, models, family):
    good, bad = good_rows(), bad_rows()
    rows = good[:3] + [r for r, _, _ in bad] + good[3:] + [LONG]
    data = dataset(str(tmp_path), rows)
    cfg = vlm_cfg(str(tmp_path / "run"), models[family], data)
    manifest = prepare(cfg)
    processor = load_processor(models[family])

    # each bad image: one bad row naming file, row and field; every other row is kept
    report = [json.loads(x) for x in open(os.path.join(cfg.prepared_path, "bad_rows.jsonl"))]
    assert [(b["file"], b["row"], b["field"]) for b in report] == \
        [(data, n, "image") for n in range(4, 4 + len(bad))]
    for entry, (_, _, pattern) in zip(report, bad, strict=True):
        assert re.search(pattern, entry["reason"]), entry["reason"]
    kept = {r["id"]: r for r in all_rows(cfg)}
    assert sorted(kept, key=lambda i: int(i.split(":")[1])) == \
        ["data:1", "data:2", "data:3", "data:9", "data:10", "data:11"]
    # max_len counts the expanded tokens; a longer sample is a filtered row, never cut
    assert manifest["length"]["train"]["filtered_too_long"] == 1
    assert manifest["length"]["filtered_ids"] == ["data:12"]

    structure = processor.structure_token_ids
    for sid, n_images in (("data:1", 1), ("data:2", 1), ("data:3", 1), ("data:9", 2),
                          ("data:10", 1)):
        row = kept[sid]
        assert len(row["images"]) == len(row["image_sha256"]) == n_images
        assert row["image_sha256"] == [hashlib.sha256(b).hexdigest() for b in row["images"]]
        pixels = processor.pixels(decode_stored(row["images"], where=sid))
        n_tokens = sum(t == processor.image_token_id for t in row["input_ids"])
        assert n_tokens == implied_image_tokens(processor, pixels) >= n_images
        if sid == "data:2":
            assert n_tokens > n_images  # the photo is expanded to a run of image tokens
        assert not any(m for t, m in zip(row["input_ids"], row["loss_mask"], strict=True)
                       if t in structure)
        assert row["teacher_input_ids"] is None  # teacher == student: it reads input_ids
    with open(CHINA, "rb") as f:
        assert kept["data:2"]["images"] == [f.read()]  # an absolute path, stored as is
    target = processor.tokenizer.decode([t for t, m in zip(
        kept["data:3"]["input_ids"], kept["data:3"]["loss_mask"], strict=True) if m])
    assert target.strip().startswith("A dahlia.")  # the inline data-URL image row
    text = kept["data:11"]  # a text-only row in an image dataset
    assert text["images"] is None and text["image_sha256"] is None
    assert processor.image_token_id not in text["input_ids"] and sum(text["loss_mask"]) > 0
    info = manifest["tokenizers"]
    assert info["student"]["processor_hash"] == processor_hash(processor)
    assert info["teacher"]["processor_hash"] == processor_hash(processor)


def test_data_hash_follows_image_bytes_and_text_hash_is_unchanged(tmp_path, models):
    from PIL import Image

    data = dataset(str(tmp_path), good_rows())
    cfg = vlm_cfg(str(tmp_path / "run"), models["idefics3"], data)
    first = prepare(cfg)
    assert prepare(cfg) == first  # a rerun with the same images changes nothing
    image = Image.open(tmp_path / "imgs" / "red.png")
    image.putpixel((0, 0), (201, 20, 20))  # one pixel of one image: same file name and size
    image.save(tmp_path / "imgs" / "red.png")
    second = prepare(cfg)
    assert second["fingerprint"] == first["fingerprint"]  # the jsonl did not change...
    assert second["data_hash"] != first["data_hash"]  # ...but the prepared data did
    assert second["created_at"] >= first["created_at"]

    # text rows: the content hash is the one of the columns text data always had
    table = to_table([{"id": "a", "input_ids": [1, 2], "loss_mask": [0, 1], "prompt_len": 1}])
    h = hashlib.sha256()
    for name in ("id", "input_ids", "loss_mask", "teacher_input_ids", "teacher_loss_mask",
                 "label"):
        h.update(name.encode() + b"\0")
        h.update(json.dumps(table.column(name).to_pylist(), separators=(",", ":")).encode())
    assert content_hash(table) == h.hexdigest()


def test_parallel_build_is_byte_identical(tmp_path, models, monkeypatch):
    rows = (good_rows() + [r for r, _, _ in bad_rows()] + [LONG]) * 3
    data = dataset(str(tmp_path), rows)
    serial = vlm_cfg(str(tmp_path / "one"), models["qwen2_vl"], data, preprocess_num_workers=1)
    prepare(serial)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ROWS", 1)
    monkeypatch.setattr(parallel, "MAX_CHUNK_ROWS", 5)
    monkeypatch.setattr(parallel, "available_cpus", lambda: 2)
    two = vlm_cfg(str(tmp_path / "two"), models["qwen2_vl"], data, preprocess_num_workers=2)
    with monkeypatch.context() as m:
        used = []
        m.setattr(parallel.RowBuilder, "_start", lambda self, f=parallel.RowBuilder._start:
                  used.append(1) or f(self))
        prepare(two)
        assert used  # the worker pool really ran
    for name in ("train.parquet", "eval.parquet", "bad_rows.jsonl"):
        with open(os.path.join(serial.prepared_path, name), "rb") as a, \
                open(os.path.join(two.prepared_path, name), "rb") as b:
            assert a.read() == b.read(), name


def test_teacher_with_its_own_processor_gets_teacher_columns(tmp_path, models):
    teacher = str(tmp_path / "teacher")
    shutil.copytree(models["qwen2_vl"], teacher)
    config = os.path.join(teacher, "preprocessor_config.json")
    with open(config) as f:
        settings = json.load(f)
    settings["size"]["longest_edge"] *= 4  # more pixels: a longer image-token run
    with open(config, "w") as f:
        json.dump(settings, f)
    data = dataset(str(tmp_path), good_rows())
    cfg = vlm_cfg(str(tmp_path / "run"), models["qwen2_vl"], data, teacher=teacher)
    manifest = prepare(cfg)
    assert manifest["tokenizers"]["teacher_tokenization"] is True
    assert manifest["tokenizers"]["teacher_tokenization_reason"] == \
        "the teacher's image processor differs"
    student_p, teacher_p = load_processor(models["qwen2_vl"]), load_processor(teacher)
    assert manifest["tokenizers"]["teacher"]["processor_hash"] == processor_hash(teacher_p)
    longer = 0
    for row in all_rows(cfg):
        if not row["images"]:
            continue
        images = decode_stored(row["images"], where=row["id"])
        s_n = row["input_ids"].count(student_p.image_token_id)
        t_n = row["teacher_input_ids"].count(teacher_p.image_token_id)
        assert s_n == implied_image_tokens(student_p, student_p.pixels(images))
        assert t_n == implied_image_tokens(teacher_p, teacher_p.pixels(images)) >= s_n
        longer += t_n > s_n
        assert sum(row["teacher_loss_mask"]) == sum(row["loss_mask"])  # the same reply
    assert longer >= 3  # the photos: each side expanded them with its own processor


def test_refusals(tmp_path, models, tiny_model_dir):
    data = dataset(str(tmp_path), good_rows()[:2])
    with pytest.raises(ConfigError, match=rf"image_key 'image' is set, but the student "
                                          rf"{re.escape(tiny_model_dir)} is a text-only model"):
        prepare(vlm_cfg(str(tmp_path / "a"), tiny_model_dir, data))
    with pytest.raises(ConfigError, match=r"does not support length_policy: truncate"):
        prepare(vlm_cfg(str(tmp_path / "b"), models["idefics3"], data,
                        length_policy="truncate"))
    with pytest.raises(ConfigError, match=r"different vocabularies: cross-tokenizer alignment "
                                          r"does not handle image blocks yet"):
        prepare(vlm_cfg(str(tmp_path / "c"), models["idefics3"], data,
                        teacher=models["qwen2_vl"], kd_algorithm="dskd"))
