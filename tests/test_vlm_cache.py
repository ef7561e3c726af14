"""The teacher cache with images, on both tiny VLM families: logits rebuilt from the cached
states equal the teacher's own forward on the same image inputs; the key follows the
processor config; an engine whose expansion differs from prepare's raises, never cuts."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from _vlm_data import bad_rows, dataset, good_rows, vlm_cfg

from kubedistill.data.images import decode_stored
from kubedistill.data.prepare import prepare
from kubedistill.errors import ArtifactMismatch
from kubedistill.models.tiny_vlm import build_tiny_vlm, load_vlm
from kubedistill.teacher.cache import cache_teacher, read_teacher_rows
from kubedistill.teacher.key import expected_cache_key
from kubedistill.teacher.reader import TeacherCache
from kubedistill.vlm.inputs import ExpansionMismatch
from kubedistill.vlm.processing import load_processor

FAMILIES = ("idefics3", "qwen2_vl")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {f: build_tiny_vlm(str(root / f), f) for f in FAMILIES}


def with_processor_change(src: str, dst: str) -> str:
    """A copy of ``src`` whose processor expands images to more tokens (same weights)."""
    shutil.copytree(src, dst)
    name = "processor_config.json" if os.path.exists(os.path.join(dst, "processor_config.json")) \
        else "preprocessor_config.json"
    path = os.path.join(dst, name)
    with open(path) as f:
        settings = json.load(f)
    if "image_seq_len" in settings:  # Idefics3: tokens per image
        settings["image_seq_len"] += 5
    else:  # Qwen2-VL: more pixels, a larger grid
        settings["size"]["longest_edge"] *= 4
    with open(path, "w") as f:
        json.dump(settings, f)
    return dst


def cache_cfg(tmp_path, student: str, teacher: str, data: str, name: str = "run"):
    cfg = vlm_cfg(str(tmp_path / name), student, data, teacher=teacher)
    for key, value in {"teacher_backend": "hf", "cache_dtype": "fp32", "device": "cpu",
                       "teacher_batch_tokens": 4096, "cache_rows_per_shard": 4}.items():
        cfg.set(key, value)
    return cfg


def own_logits(model, processor, tokens, blobs) -> torch.Tensor:
    """The HF model's own forward on one unpadded sample, positions left to the model."""
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    kwargs = {"input_ids": ids}
    if blobs:
        kwargs.update(processor.collate([processor.pixels(decode_stored(blobs, where="t"))]))
    if "image_grid_thw" in kwargs:  # M-RoPE: the model builds its 3-D positions from these
        kwargs["mm_token_type_ids"] = (ids == processor.image_token_id).int()
    with torch.no_grad():
        return model(**kwargs).logits[0]


@pytest.mark.parametrize("family, own_processor", [("idefics3", False), ("qwen2_vl", False),
                                                   ("qwen2_vl", True)])
def test_cached_states_rebuild_the_teachers_own_logits(tmp_path, models, family, own_processor):
    teacher = models[family]
    if own_processor:  # the teacher expands with its own processor: teacher_* columns
        teacher = with_processor_change(teacher, str(tmp_path / "teacher"))
    data = dataset(str(tmp_path), good_rows() + [r for r, _, _ in bad_rows()])
    cfg = cache_cfg(tmp_path, models[family], teacher, data)
    prepare(cfg)
    summary = cache_teacher(cfg)
    assert summary["status"] == "written" and summary["rows"] == 6
    cache = TeacherCache(cfg.teacher_cache_path)
    assert cache.manifest["key"]["processor"] == expected_cache_key(cfg)["processor"]
    head = cache.head()
    model, processor = load_vlm(teacher), load_processor(teacher)
    checked = with_images = long_runs = 0
    for split in ("train", "eval"):
        rows = read_teacher_rows(cfg.prepared_path, split)
        for sid, tokens, pos, blobs in zip(rows.ids, rows.tokens, rows.positions, rows.images,
                                           strict=True):
            states = cache.get(sid, split=split)
            assert states.positions.tolist() == pos.tolist()
            expected = own_logits(model, processor, tokens, blobs)[torch.as_tensor(pos).long()]
            torch.testing.assert_close(head.logits(states.hidden), expected, rtol=0, atol=1e-5)
            checked += 1
            with_images += bool(blobs)
            long_runs += int((torch.as_tensor(tokens) == processor.image_token_id).sum()) > 2
    assert checked == 6 and with_images == 5
    if own_processor:  # the cache ran the teacher's own expansion (teacher_input_ids)
        assert long_runs >= 3


def test_key_follows_the_processor_and_expansion_mismatch_raises(tmp_path, models):
    data = dataset(str(tmp_path), good_rows()[:3])
    cfg = cache_cfg(tmp_path, models["idefics3"], models["idefics3"], data)
    prepare(cfg)
    cache_teacher(cfg)
    changed = with_processor_change(models["idefics3"], str(tmp_path / "changed"))
    other = cache_cfg(tmp_path, models["idefics3"], changed, data)  # same prepared data
    key, other_key = expected_cache_key(cfg), expected_cache_key(other)
    assert key["processor"] != other_key["processor"]
    assert {k for k in key if key[k] != other_key[k]} == {"processor"}
    with pytest.raises(ArtifactMismatch, match=r"differing key part\(s\): processor"):
        cache_teacher(other)  # the complete cache was built with the other processor
    other.set("teacher_cache_path", str(tmp_path / "other-cache"))
    with pytest.raises(ExpansionMismatch, match=r"sample data:\d+: its 1 image\(s\) expand to "
                                                r"9 image tokens .* prepared tokens hold 4"):
        cache_teacher(other)
