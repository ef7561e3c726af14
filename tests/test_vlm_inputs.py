"""Tiny VLMs (Idefics3, Qwen2-VL): processors, expanded tokens, loss masks, M-RoPE positions,
training-forward == HF forward, and teacher hidden states that rebuild the logits."""

from __future__ import annotations

import os

import pytest
import sklearn
import torch

from kubedistill.data.images import attach_images
from kubedistill.models.tiny_vlm import build_tiny_vlm, load_vlm
from kubedistill.teacher.head import TeacherHead
from kubedistill.teacher.vlm_states import image_text_final_states
from kubedistill.vlm.inputs import (
    ExpandedTooLong,
    ExpansionMismatch,
    check_expansion,
    collate,
    encode_sample,
    forward_kwargs,
    position_ids,
)
from kubedistill.vlm.processing import AutoImageTextProcessor, PadExpandingProcessor, load_processor

IMAGES = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
CHINA, FLOWER = (os.path.join(IMAGES, n) for n in ("china.jpg", "flower.jpg"))
FAMILIES = ("idefics3", "qwen2_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    out = build_tiny_vlm(str(tmp_path_factory.mktemp(request.param)), request.param)
    return request.param, load_vlm(out), load_processor(out)


def _samples(processor):
    rows = [([{"role": "user", "content": "<image>What is this?"},
              {"role": "assistant", "content": "A temple."}], [CHINA]),
            ([{"role": "user", "content": "Compare <image> with <image>, briefly please."},
              {"role": "assistant", "content": "Two photos, one of a flower."}],
             [FLOWER, CHINA])]
    out = []
    for messages, paths in rows:
        s = attach_images(messages, paths, base_dir=None, input_field="messages",
                          image_field="image")
        out.append(encode_sample(processor, s.messages, [im.image for im in s.images]))
    return out


def test_reload_offline_gives_the_family_classes(vlm):
    family, model, processor = vlm
    expected = {"idefics3": ("Idefics3ForConditionalGeneration", AutoImageTextProcessor),
                "qwen2_vl": ("Qwen2VLForConditionalGeneration", PadExpandingProcessor)}
    assert type(model).__name__ == expected[family][0]
    assert isinstance(processor, expected[family][1])
    if family == "idefics3":
        assert type(processor.processor.image_processor).__name__ == "Idefics3ImageProcessorPil"


def test_expanded_tokens_and_loss_mask(vlm):
    family, model, processor = vlm
    one, two = _samples(processor)
    image_id = processor.image_token_id
    per_image = {"idefics3": (32 // 8) ** 2 // 2 ** 2}
    for sample, n_images in ((one, 1), (two, 2)):
        n_tokens = sum(t == image_id for t in sample.input_ids)
        if family == "qwen2_vl":
            grid = sample.pixels["image_grid_thw"]
            assert grid.shape[0] == n_images
            assert n_tokens == int(grid.prod(-1).sum()) // 4
        else:
            assert n_tokens == n_images * per_image[family]
        assert n_tokens > n_images  # expanded, not one marker per image
        structure = processor.structure_token_ids
        assert all(not m for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if t in structure)
        assert all(m == 0 for m in sample.loss_mask[:sample.prompt_len])
        target = processor.tokenizer.decode(
            [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m])
        assert target.startswith((" A temple.", "A temple.", " Two photos", "Two photos"))


def test_max_len_counts_expanded_tokens(vlm):
    _, _, processor = vlm
    one = _samples(processor)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is "
                                          "this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A temple."}]}]
    from PIL import Image

    image = Image.open(CHINA).convert("RGB")
    assert encode_sample(processor, msgs, [image], max_len=len(one.input_ids)).input_ids == \
        one.input_ids
    text_len = len(processor.tokenizer(processor.render(msgs))["input_ids"])
    assert text_len < len(one.input_ids)  # the unexpanded text would fit
    with pytest.raises(ExpandedTooLong, match=rf"{len(one.input_ids)} tokens with images "
                                              rf"expanded > max_len {len(one.input_ids) - 1}"):
        encode_sample(processor, msgs, [image], max_len=len(one.input_ids) - 1)


def test_check_expansion_raises_never_truncates(vlm):
    _, _, processor = vlm
    ids = _samples(processor)[0].input_ids
    check_expansion(ids, list(ids), image_token_id=processor.image_token_id, where="row 0")
    image_at = ids.index(processor.image_token_id)
    replaced = ids[:image_at] + [processor.tokenizer.pad_token_id] + ids[image_at + 1:]
    n = sum(t == processor.image_token_id for t in ids)
    with pytest.raises(ExpansionMismatch, match=rf"row 0: .*{n - 1} vs {n} image tokens, first "
                                                rf"difference at position {image_at}\)"):
        check_expansion(ids, replaced, image_token_id=processor.image_token_id, where="row 0")
    with pytest.raises(ExpansionMismatch, match=rf"{len(ids) - 1} vs {len(ids)} tokens"):
        check_expansion(ids, ids[:-1], image_token_id=processor.image_token_id, where="row 0")


def _hf_own_logits(model, processor, sample):
    """The HF model's own forward on one unpadded sample, positions left to the model."""
    kwargs = {"input_ids": torch.tensor([sample.input_ids])}
    kwargs.update(processor.collate([sample.pixels]))
    kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == processor.image_token_id).int()
    if "image_grid_thw" not in kwargs:
        kwargs.pop("mm_token_type_ids")  # only M-RoPE models take it
    with torch.no_grad():
        return model(**kwargs).logits[0]


def test_training_forward_equals_hf_forward(vlm):
    family, model, processor = vlm
    samples = _samples(processor)
    batch = collate(samples, processor, pad_id=processor.tokenizer.pad_token_id)
    kwargs = forward_kwargs(model, batch)
    assert kwargs["position_ids"].dim() == (3 if family == "qwen2_vl" else 2)
    with torch.no_grad():
        logits = model(**kwargs).logits
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        torch.testing.assert_close(logits[row, :n], _hf_own_logits(model, processor, sample),
                                   rtol=0, atol=1e-5)


def test_collate_keeps_each_image_once(vlm):
    family, _, processor = vlm
    samples = _samples(processor)
    batch = collate(samples, processor, pad_id=processor.tokenizer.pad_token_id)
    if family == "qwen2_vl":
        assert batch["image_grid_thw"].shape[0] == 3
        assert batch["pixel_values"].shape[0] == sum(s.pixels["pixel_values"].shape[0]
                                                     for s in samples)
        assert torch.equal(batch["pixel_values"][:samples[0].pixels["pixel_values"].shape[0]],
                           samples[0].pixels["pixel_values"])
    else:
        pv = batch["pixel_values"]
        assert pv.shape[:2] == (2, 2)  # the 1-image row is padded with an all-zero image
        real = pv.flatten(2).ne(0).any(-1)
        assert real.tolist() == [[True, False], [True, True]]
    assert batch["mm_token_type_ids"].sum() == sum(
        sum(t == processor.image_token_id for t in s.input_ids) for s in samples)


def test_processor_config_follows_the_image_processor(vlm, tmp_path):
    import json

    family, _, processor = vlm
    config = processor.config()
    json.dumps(config)  # JSON-able, for the cache key
    images = processor.processor.image_processor if family == "idefics3" else \
        processor.image_processor
    before = json.dumps(config, sort_keys=True)
    saved = images.do_normalize
    images.do_normalize = not saved
    try:
        assert json.dumps(processor.config(), sort_keys=True) != before
    finally:
        images.do_normalize = saved
    assert json.dumps(processor.config(), sort_keys=True) == before


def test_positions_are_the_models_own(vlm):
    """Qwen2-VL: 3-D M-RoPE positions, and 2-D text positions would change the logits.
    Idefics3 (1-D RoPE): the text positions of each row, padding clamped to 0."""
    family, model, processor = vlm
    samples = _samples(processor)
    batch = collate(samples, processor, pad_id=processor.tokenizer.pad_token_id)
    pos = position_ids(model, batch)
    width = batch["input_ids"].shape[1]
    if family == "idefics3":
        short = len(samples[0].input_ids)
        assert pos.shape == (2, width)
        assert pos[1].tolist() == list(range(width))
        assert pos[0, :short].tolist() == list(range(short)) and not pos[0, short:].any()
        return
    assert pos.shape == (3, 2, width)
    assert not torch.equal(pos[1], pos[2])  # h and w differ inside the image blocks
    sample = samples[1]
    one = collate([sample], processor)
    kwargs = forward_kwargs(model, one)
    text_pos = torch.arange(len(sample.input_ids))[None]
    with torch.no_grad():
        right = model(**kwargs).logits[0]
        wrong = model(**{**kwargs, "position_ids": text_pos}).logits[0]
    torch.testing.assert_close(right, _hf_own_logits(model, processor, sample), rtol=0, atol=1e-5)
    assert (right - wrong).abs().max() > 1e-3


def test_teacher_states_rebuild_the_logits(vlm):
    _, model, processor = vlm
    samples = _samples(processor)
    batch = collate(samples, processor, pad_id=processor.tokenizer.pad_token_id)
    positions = [s.loss_positions for s in samples]
    assert all(len(p) > 3 for p in positions)
    states = image_text_final_states(model, batch, positions)
    head = TeacherHead.from_model(model)
    for sample, pos, h in zip(samples, positions, states, strict=True):
        assert h.shape == (len(pos), model.config.get_text_config().hidden_size)
        own = _hf_own_logits(model, processor, sample)[pos]
        torch.testing.assert_close(head.logits(h), own, rtol=0, atol=1e-5)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tiny VLM family 'llava'"):
        build_tiny_vlm(str(tmp_path), "llava")
