"""The demo VLM teacher: Idefics3 carrying the real SmolLM2-135M-Instruct text weights."""

from __future__ import annotations

import os

import pytest
import sklearn
import torch
from PIL import Image

from kubedistill.data.images import attach_images
from kubedistill.models.demo_vlm import build_smollm2_idefics3
from kubedistill.models.tiny_vlm import load_vlm
from kubedistill.teacher.head import TeacherHead
from kubedistill.teacher.vlm_states import image_text_final_states
from kubedistill.vlm.inputs import collate, encode_sample
from kubedistill.vlm.processing import load_processor

FLOWER = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "flower.jpg")
pytestmark = pytest.mark.slow
SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def demo(smollm2_dir, tmp_path_factory):
    out = build_smollm2_idefics3(str(tmp_path_factory.mktemp("demo_vlm")), text_dir=smollm2_dir,
                                 vision=SMALL_VISION, scale_factor=2)
    return load_vlm(out), load_processor(out)


def test_text_logits_are_smollm2s(demo, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, processor = demo
    text = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    vocab = text.config.vocab_size
    assert model.config.get_text_config().num_hidden_layers == text.config.num_hidden_layers == 30
    assert model.config.get_text_config().vocab_size == vocab + 4  # the four image tokens
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    assert processor.tokenizer(tok.decode(ids[0]), add_special_tokens=False)["input_ids"] == \
        ids[0].tolist()  # the extended tokenizer still tokenizes text as SmolLM2 does
    with torch.no_grad():
        want = text(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got[..., :vocab], want, rtol=0, atol=1e-5)


def test_image_sample_runs_and_states_rebuild_logits(demo):
    model, processor = demo
    s = attach_images([{"role": "user", "content": "<image>Describe the picture."},
                       {"role": "assistant", "content": "A red flower."}], [FLOWER],
                      base_dir=None, input_field="messages", image_field="image")
    sample = encode_sample(processor, s.messages, [im.image for im in s.images])
    assert sum(t == processor.image_token_id for t in sample.input_ids) == (32 // 8) ** 2 // 4
    target = processor.tokenizer.decode(
        [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m])
    assert target.startswith("A red flower.")
    batch = collate([sample], processor)
    pos = sample.loss_positions
    states = image_text_final_states(model, batch, [pos])[0]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    pixel_attention_mask=batch["pixel_attention_mask"],
                    output_hidden_states=True)
    torch.testing.assert_close(states, out.hidden_states[-1][0, pos], rtol=0, atol=1e-5)
    # Real-scale logits (|z| ~ 20): the same product in another matmul shape differs by
    # float32 rounding only, ~2e-5 here.
    rebuilt = TeacherHead.from_model(model).logits(states)
    assert float((rebuilt - out.logits[0, pos]).abs().max()) <= 1e-4
    assert Image.open(FLOWER).size == (640, 427)
