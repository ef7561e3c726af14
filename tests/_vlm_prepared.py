"""Small prepared image-text datasets for the VLM training tests, written to the prepared
contract (docs/vlm.md): ``input_ids`` / ``loss_mask`` / ``prompt_len`` from
``vlm.inputs.encode_sample`` with the student's processor (image tokens expanded), the
stored image bytes in ``images``, their sha256 in ``image_sha256``.

Images are real photos (scikit-image / sklearn samples), cropped and shrunk to a few dozen
pixels and stored as PNG, so a batch decodes in milliseconds. Sample ``i`` has ``i % 3``
images (0: a text row), so batches mix text rows, one-image and two-image rows.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import sklearn

PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
WORDS = ("red", "blue", "temple", "flower", "sky", "stone", "green", "roof", "petal", "light")


def small_photos(n: int, seed: int = 0) -> list[bytes]:
    """``n`` PNG crops (20..60 px a side) of the two sample photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.open(os.path.join(PHOTOS, name)).convert("RGB")
              for name in ("china.jpg", "flower.jpg")]
    out = []
    for i in range(n):
        photo = photos[i % 2]
        w, h = (int(x) for x in rng.integers(20, 61, 2))
        x, y = int(rng.integers(0, photo.width - 4 * w)), int(rng.integers(0, photo.height - 4 * h))
        buf = io.BytesIO()
        photo.crop((x, y, x + 4 * w, y + 4 * h)).resize((w, h)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def vlm_rows(model_dir: str, n: int, split: str, seed: int = 0) -> list[dict]:
    from kubedistill.data.images import attach_images
    from kubedistill.vlm.inputs import encode_sample
    from kubedistill.vlm.processing import load_processor

    processor = load_processor(model_dir)
    rng = np.random.default_rng(seed)
    photos = iter(small_photos(2 * n, seed))
    rows = []
    for i in range(n):
        k = i % 3
        blobs = [next(photos) for _ in range(k)]
        question = "<image>" * k + " ".join(rng.choice(WORDS, 3)) + "?"
        answer = " ".join(rng.choice(WORDS[:4], int(rng.integers(2, 5)))) + "."
        sample = attach_images([{"role": "user", "content": question},
                                {"role": "assistant", "content": answer}],
                               blobs or None, base_dir=None, input_field="messages",
                               image_field="images")
        enc = encode_sample(processor, sample.messages, [im.image for im in sample.images])
        rows.append({"id": f"{split}:{i}", "input_ids": enc.input_ids,
                     "loss_mask": enc.loss_mask, "prompt_len": enc.prompt_len,
                     "response": answer, "images": blobs or None,
                     "image_sha256": [hashlib.sha256(b).hexdigest() for b in blobs] or None})
    return rows


def write_vlm_prepared(out_dir: str, model_dir: str, sizes: dict[str, int]) -> str:
    from _prepared import write_splits

    return write_splits(out_dir, {split: vlm_rows(model_dir, n, split, seed)
                                  for seed, (split, n) in enumerate(sizes.items())})
