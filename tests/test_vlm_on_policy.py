"""On-policy distillation with images on both tiny VLM families (Idefics3, Qwen2-VL).

- the hf rollout samples with the prompt's pixels: each sample's tokens start with exactly
  the prepared prompt (image tokens included), it keeps the prompt's images, and its sampling
  log-probs equal the student's own forward with those pixels and its own (M-RoPE) positions;
- the SGLang glue (no GPU here): the prompt goes back to one placeholder per image, proven by
  re-encoding, requests carry ``image_data``, and a length mismatch is an error;
- refusals: cross-tokenizer pairs with an image-text model, a text student on image prompts;
- an on-policy iteration end to end (rollout with pixels, teacher scoring with pixels, an
  optimizer step, weight sync), the teacher's states differ without pixels; and a
  self-distillation iteration whose teacher copy sees the same images.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
import sklearn
import torch

from kubedistill.config import Config
from kubedistill.errors import ConfigError

FAMILIES = ("idefics3", "qwen2_vl")
PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")


def _photos(n: int) -> list[bytes]:
    """``n`` small PNG crops of the two sample photos (decode in milliseconds)."""
    from PIL import Image

    photos = [Image.open(os.path.join(PHOTOS, f)).convert("RGB")
              for f in ("china.jpg", "flower.jpg")]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        photos[i % 2].crop((40 * i, 30 * i, 40 * i + 224, 30 * i + 168)).resize(
            (112, 84)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _rows(model_dir: str, n: int, teacher_view: bool = False) -> list[dict]:
    """Row ``i`` has ``(i % 3) or 1`` images, except row 3, a text row. ``teacher_view``:
    every row also has ``teacher_input_ids`` (a system prompt before the same chat and
    images), the teacher's own view as ``teacher_input_key`` gives it."""
    from kubedistill.data.images import attach_images
    from kubedistill.vlm.inputs import encode_sample
    from kubedistill.vlm.processing import load_processor

    processor = load_processor(model_dir)
    photos = iter(_photos(2 * n))
    rows = []
    for i in range(n):
        k = 0 if i == 3 else (i % 3) or 1
        blobs = [next(photos) for _ in range(k)]
        s = attach_images([{"role": "user", "content": "<image>" * k + f"What is {i}?"},
                           {"role": "assistant", "content": "A roof."}], blobs or None,
                          base_dir=None, input_field="messages", image_field="images")
        images = [im.image for im in s.images]
        enc = encode_sample(processor, s.messages, images)
        rows.append({"id": f"train:{i}", "input_ids": enc.input_ids, "loss_mask": enc.loss_mask,
                     "prompt_len": enc.prompt_len, "response": "A roof.",
                     "images": blobs or None,
                     "image_sha256": [hashlib.sha256(b).hexdigest() for b in blobs] or None})
        if teacher_view:
            system = {"role": "system", "content": [{"type": "text", "text": "Look closely."}]}
            t = encode_sample(processor, [system, *s.messages], images)
            rows[-1].update(teacher_input_ids=t.input_ids, teacher_loss_mask=t.loss_mask,
                            teacher_prompt_len=t.prompt_len)
    return rows


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """``(family, student_dir, teacher_dir, prepared_dir)``: two seeds of one family (the
    same tokenizer and processor), and 6 prepared rows (5 with images). Qwen2-VL keeps the
    112x84 photos at 12 image tokens each (an 8x6 patch grid, merged 2x2)."""
    from _prepared import write_splits

    from kubedistill.models.tiny_vlm import build_tiny_vlm

    root = tmp_path_factory.mktemp(request.param)
    size = {"max_pixels": 112 * 84} if request.param == "qwen2_vl" else {}
    student = build_tiny_vlm(str(root / "student"), request.param, seed=0, **size)
    teacher = build_tiny_vlm(str(root / "teacher"), request.param, seed=1, **size)
    prepared = write_splits(str(root / "prepared"), {"train": _rows(student, 6)})
    return request.param, student, teacher, prepared


@pytest.fixture(scope="module")
def teacher_view(pair, tmp_path_factory) -> str:
    """The rows of ``pair`` with a teacher view (see :func:`_rows`): a self-distillation
    teacher starts as the student, so only its own prompt makes its states differ."""
    from _prepared import write_splits

    root = tmp_path_factory.mktemp(f"{pair[0]}_teacher_view")
    return write_splits(str(root), {"train": _rows(pair[1], 6, teacher_view=True)})


def _prompts(prepared):
    from kubedistill.train.on_policy_data import load_prompts

    return load_prompts(prepared, "train", 512)


# ---- rollout -----------------------------------------------------------------------------
def test_hf_rollout_uses_the_pixels_and_keeps_the_prepared_prompt(pair):
    from kubedistill.data.images import decode_stored
    from kubedistill.rollout.hf import HFRolloutEngine
    from kubedistill.vlm.inputs import VLMSample, collate, forward_kwargs

    _, student, _, prepared = pair
    prompts = _prompts(prepared)
    assert prompts.images is not None and prompts.images[3] is None
    assert sum(im is not None for im in prompts.images) == 5
    engine = HFRolloutEngine.from_pretrained(student)
    image_id = engine.processor.image_token_id
    samples = engine.generate(prompts.prompts, images=prompts.images, n_samples_per_prompt=2,
                              max_new_tokens=5, temperature=1.0, top_p=1.0, seed=3)
    assert [s.prompt_index for s in samples] == [i // 2 for i in range(12)]
    for s in samples:
        assert s.prompt_ids == prompts.prompts[s.prompt_index]  # image tokens included
        assert s.images == prompts.images[s.prompt_index]
        assert (image_id in s.prompt_ids) == (s.images is not None)
    # image tokens and their markers are never sampled; the sampling log-probs are the
    # student's own forward on prompt + response with the same pixels and its own positions
    # (3-D for Qwen2-VL), right-padded as training pads, over the vocabulary without them
    proc = engine.processor
    structure = sorted(proc.structure_token_ids)
    assert not any(t in structure for s in samples for t in s.response_ids)

    def logprobs(with_pixels: bool) -> list[list[float]]:
        rows = [VLMSample(s.prompt_ids + s.response_ids, [0] * len(s.prompt_ids)
                          + [1] * len(s.response_ids), len(s.prompt_ids),
                          proc.pixels(decode_stored(s.images, where="t"))
                          if s.images and with_pixels else {}) for s in samples]
        batch = collate(rows, proc, pad_id=engine.pad_id)
        if not with_pixels:
            batch["mm_token_type_ids"].zero_()
        with torch.no_grad():
            logits = engine.model(**forward_kwargs(engine.model, batch)).logits.float()
        logits[..., structure] = -float("inf")
        lp = torch.log_softmax(logits, -1)
        return [[float(lp[j, len(s.prompt_ids) - 1 + k, t])
                 for k, t in enumerate(s.response_ids)] for j, s in enumerate(samples)]

    ref = logprobs(True)
    for s, r in zip(samples, ref, strict=True):
        np.testing.assert_allclose(s.logprobs, r, atol=1e-4)
    blind = logprobs(False)
    worst = max(abs(a - b) for s, r in zip(samples, blind, strict=True) if s.images
                for a, b in zip(s.logprobs, r, strict=True))
    assert worst > 1e-3, worst  # the pixels change what the student predicts


def test_sglang_requests_carry_images_and_the_unexpanded_prompt(pair):
    from kubedistill.data.images import decode_stored
    from kubedistill.rollout.sglang import SGLangRolloutEngine
    from kubedistill.sglang_engine import unexpanded_prompt
    from kubedistill.vlm.inputs import ExpansionMismatch
    from kubedistill.vlm.processing import load_processor

    _, student, _, prepared = pair
    prompts = _prompts(prepared)
    proc = load_processor(student)
    two = next(i for i, im in enumerate(prompts.images) if im and len(im) == 2)
    images = decode_stored(prompts.images[two], where="t")
    short = unexpanded_prompt(prompts.prompts[two], images, proc, where="t")
    assert short.count(proc.image_token_id) == 2  # one placeholder per image
    assert proc.encode(proc.tokenizer.decode(short), images)[0] == prompts.prompts[two]
    with pytest.raises(ExpansionMismatch, match="cannot rebuild"):
        unexpanded_prompt(prompts.prompts[two], images[:1], proc, where="t")

    class Recorded:  # the shape of Engine.generate's outputs (no GPU here)
        def __init__(self, lengths: list[int], image_at: int = -1):
            self.calls, self.lengths = [], lengths  # prompt_tokens per request
            self.image_at = image_at  # this request samples the image token first

        def generate(self, **kw):
            self.calls.append(kw)
            return [{"output_ids": [proc.image_token_id if i == self.image_at else 7, 2],
                     "meta_info": {
                "finish_reason": {"type": "stop", "matched": 2},
                "prompt_tokens": self.lengths[i],
                "output_token_logprobs": [(-0.5, 7, None), (-0.1, 2, None)]}}
                for i in range(len(kw["input_ids"]))]

    picked = [two, 3]  # an image prompt and the text row
    fake = Recorded([len(prompts.prompts[i]) for i in picked for _ in range(2)], image_at=1)
    engine = SGLangRolloutEngine(fake, {2}, processor=proc)
    samples = engine.generate([prompts.prompts[i] for i in picked],
                              images=prompts.images_of(picked), n_samples_per_prompt=2,
                              max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    req = fake.calls[0]
    assert req["input_ids"][0] == short and req["input_ids"][2] == prompts.prompts[3]
    assert [len(d) for d in req["image_data"]] == [2, 2, 0, 0]
    assert [s.prompt_ids for s in samples][0] == prompts.prompts[two]  # the prepared ids
    assert samples[0].images == prompts.images[two] and samples[2].images is None
    assert samples[0].response_ids == [7, 2] and samples[0].finish_reason == "stop"
    # a sampled image token has no pixels behind it: the response is cut before it
    assert samples[1].response_ids == [] and samples[1].truncated
    with pytest.raises(ExpansionMismatch, match="SGLang expanded the prompt"):
        SGLangRolloutEngine(Recorded([len(prompts.prompts[two]) + 1]), {2}, processor=proc).generate(
            [prompts.prompts[two]], images=[prompts.images[two]], n_samples_per_prompt=1,
            max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)


def test_samples_carry_their_images_into_the_teacher_and_the_split(pair):
    from kubedistill.rollout.engine import Sample
    from kubedistill.train.on_policy_data import rollout_split, teacher_requests

    _, _, _, prepared = pair
    prompts = _prompts(prepared)
    samples = [Sample(i, prompts.prompts[i], [5, 6], "length", images=prompts.images[i])
               for i in (0, 3)]
    requests = teacher_requests(samples, [prompts.teacher_prompts[i] for i in (0, 3)])
    assert requests[0].images == prompts.images[0] and requests[1].images is None
    assert requests[0].tokens == prompts.prompts[0] + [5, 6]  # teacher prompt: expanded
    split = rollout_split(["a", "b"], samples, requests)
    assert split.images == [prompts.images[0], None]
    assert rollout_split(["b"], samples[1:]).images is None  # a text-only iteration


def test_refusals_name_the_reason(pair, tiny_model_dir):
    from kubedistill.train.on_policy_config import check_images

    _, student, teacher, _ = pair
    check_images(True, False, student, teacher)
    with pytest.raises(ConfigError, match="different tokenizers is not supported.*image "
                                          "blocks have no text"):
        check_images(True, True, student, teacher)
    with pytest.raises(ConfigError, match="different tokenizers"):
        check_images(False, True, student, teacher)  # an image-text pair without images
    with pytest.raises(ConfigError, match="the student .* is not an image-text model"):
        check_images(True, False, tiny_model_dir, teacher)
    with pytest.raises(ConfigError, match="the teacher .* is not an image-text model"):
        check_images(True, False, student, tiny_model_dir)


# ---- the loop in-process (a world of one) ---------------------------------------------------
def _config(tmp_path, pair, **over) -> Config:
    _, student, teacher, prepared = pair
    cfg, wd = Config(), tmp_path / "run"
    values = dict(student_name_or_path=student, teacher_name_or_path=teacher,
                     prepared_path=prepared, rollout_num_engines=1, rollout_backend="hf",
                     teacher_backend="hf", rollout_batch_size=3, n_samples_per_prompt=2,
                     generate_max_len=4, prompt_max_len=512, temperature=1.0,
                     kd_algorithm="vanilla_kd", kd_loss_fn="rkl", kd_ratio=1.0,
                     num_gpus_per_node=1, train_batch_size=6, micro_train_batch_size=3,
                     learning_rate=5e-3, lr_warmup_ratio=0.0, num_epochs=1, save_steps=-1,
                     logging_steps=1, chunked_loss_size=16, seed=5, tracking_uri="off",
                     device="cpu", work_dir=str(wd), save_path=str(wd / "model"),
                     ckpt_path=str(wd / "ckpt"))
    for k, v in {**values, **over}.items():  # the overrides replace the defaults
        cfg.set(k, v)
    return cfg


def _one_iteration(trainer):
    """rollout (pixels) -> teacher (pixels) -> one optimizer step -> weight sync; returns
    the split, the teacher states and a copy of the teacher model that scored them."""
    import copy

    from kubedistill.train.fsdp import full_state_dict
    from kubedistill.train.trainer import _progress

    trainer.sync()
    scorer = copy.deepcopy(trainer.teacher_engine.model)  # self-distillation updates it
    before = {k: v.clone() for k, v in full_state_dict(trainer.module.student).items()}
    times: dict = {}
    split, teacher, stats = trainer.rollout(times)
    trainer.train_iteration(split, teacher, stats, _progress(trainer.total_steps, 0, False),
                            times)
    trainer.sync(times)
    trainer.end_iteration(stats, times)
    assert trainer.cursor.global_step == 1 and trainer.cursor.iteration == 1
    after = full_state_dict(trainer.module.student)
    engine = trainer.rollout_engine.state_dict()
    assert all(torch.equal(engine[k], v) for k, v in after.items())  # synced
    assert any(not torch.equal(before[k], after[k]) for k in after)  # it trained
    return split, teacher, scorer


def _check_teacher_saw_the_pixels(trainer, split, teacher, scorer) -> None:
    """Every sample of the split is ``prepared prompt + response`` with the prompt's images;
    an image sample's teacher states are the teacher's own forward (``scorer``, the model
    that scored them) on ``teacher prompt + response`` WITH the pixels and its own (M-RoPE)
    positions, and differ from the same tokens scored without pixels."""
    from kubedistill.data.images import decode_stored
    from kubedistill.vlm.inputs import VLMSample, collate, forward_kwargs
    from kubedistill.vlm.processing import load_processor

    proc, prompts = load_processor(trainer.teacher_path), trainer.prompts
    n_image = 0
    for i, sid in enumerate(split.ids):  # "it0:train:4:1": prompt train:4, its 2nd sample
        k = prompts.ids.index(sid.split(":", 1)[1].rsplit(":", 1)[0])
        tokens, mask = split.sample(i)
        prompt, t_prompt = prompts.prompts[k], prompts.teacher_prompts[k]
        assert tokens[:len(prompt)].tolist() == prompt and not mask[:len(prompt)].any()
        assert mask[len(prompt):].all() and split.images[i] == prompts.images[k]
        if split.images[i] is None:
            continue
        n_image += 1
        t_tokens = t_prompt + tokens[len(prompt):].tolist()
        states = teacher.get(sid)
        at = states.positions + (len(t_prompt) - len(prompt))  # the teacher's own positions

        def body(pixels: dict, t_tokens=t_tokens, t_prompt=t_prompt, at=at) -> torch.Tensor:
            batch = collate([VLMSample(t_tokens, [0] * len(t_tokens), len(t_prompt), pixels)],
                            proc)
            if not pixels:
                batch["mm_token_type_ids"].zero_()
            with torch.no_grad():
                out = scorer.base_model(**forward_kwargs(scorer, batch)).last_hidden_state
            return out[0, at].float()

        seen = body(proc.pixels(decode_stored(split.images[i], where=sid)))
        torch.testing.assert_close(states.hidden, seen, atol=1e-4, rtol=0)
        blind = (states.hidden - body({})).abs().max()
        assert blind > 1e-3, blind
    assert n_image >= 2


def test_on_policy_iteration_with_images(world_of_one, pair, tmp_path):
    from kubedistill.train.on_policy import OnPolicyTrainer

    trainer = OnPolicyTrainer(_config(tmp_path, pair), world_of_one)
    assert trainer.images is not None  # the student trains with pixels
    split, teacher, scorer = _one_iteration(trainer)
    assert split.images is not None
    assert trainer.prompts.teacher_prompts == trainer.prompts.prompts  # one processor
    _check_teacher_saw_the_pixels(trainer, split, teacher, scorer)


def test_self_distillation_iteration_with_images(world_of_one, pair, teacher_view, tmp_path):
    from kubedistill.train.fsdp import full_state_dict
    from kubedistill.train.on_policy import OnPolicyTrainer

    cfg = _config(tmp_path, pair, self_distillation=True, teacher_name_or_path=None,
                  prepared_path=teacher_view)
    trainer = OnPolicyTrainer(cfg, world_of_one)
    assert trainer.images is not None and trainer.self_teacher is not None
    prompts = trainer.prompts
    assert all(len(t) > len(p) for t, p in zip(prompts.teacher_prompts, prompts.prompts,
                                                strict=True))  # the teacher's own view
    split, teacher, scorer = _one_iteration(trainer)
    assert trainer.cursor.teacher_updates == 1  # theta_T <- theta_S after the iteration
    theta_t = trainer.self_teacher.model.state_dict()
    assert all(torch.equal(theta_t[k], v)
               for k, v in full_state_dict(trainer.module.student).items())
    _check_teacher_saw_the_pixels(trainer, split, teacher, scorer)


@pytest.mark.gpu
def test_sglang_rollout_with_images_on_gpu(pair):
    """SGLang samples with ``image_data``; its expansion equals prepare's (else it raises)."""
    pytest.importorskip("sglang")
    from kubedistill.rollout.sglang import SGLangRolloutEngine

    family, student, _, prepared = pair
    if family != "qwen2_vl":
        pytest.skip("SGLang's Idefics3 support is not checked here")
    cfg = Config()
    for k, v in dict(rollout_mem_fraction_static=0.2, seed=0).items():
        cfg.set(k, v)
    prompts = _prompts(prepared)
    engine = SGLangRolloutEngine.from_config(cfg, student)
    try:
        samples = engine.generate(prompts.prompts, images=prompts.images,
                                  n_samples_per_prompt=1, max_new_tokens=4, temperature=1.0,
                                  top_p=1.0, seed=0)
    finally:
        engine.close()
    for s in samples:
        assert s.prompt_ids == prompts.prompts[s.prompt_index]
        assert s.images == prompts.images[s.prompt_index] and len(s.response_ids) >= 1
