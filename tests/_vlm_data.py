"""Image datasets for the VLM prepare and cache tests: real JPEGs (sklearn's sample photos)
and PNGs written here with PIL (RGB, RGBA, too big, broken, empty), rows in every image
source form, and the bad-image rows with the field each one names."""

from __future__ import annotations

import base64
import json
import os
import shutil

import sklearn

from kubedistill.config import Config

PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
CHINA, FLOWER = (os.path.join(PHOTOS, n) for n in ("china.jpg", "flower.jpg"))
MAX_PIXELS = 300_000  # the photos are 427 x 640 = 273,280 pixels; big.png is over


def write_images(folder: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 20, 20)).save(os.path.join(folder, "red.png"))
    rgba = Image.new("RGBA", (24, 24), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 12, 24))  # left half opaque blue, right transparent
    rgba.save(os.path.join(folder, "rgba.png"))
    Image.new("RGB", (600, 600), (1, 2, 3)).save(os.path.join(folder, "big.png"))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    open(os.path.join(folder, "empty.png"), "wb").close()
    shutil.copy(CHINA, os.path.join(folder, "china.jpg"))


def _chat(prompt, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def good_rows() -> list[dict]:
    """Six usable rows: relative path, absolute path + OpenAI parts, inline data URL, a list
    of two (RGBA among them), raw text with no image, and a text-only row."""
    with open(FLOWER, "rb") as f:
        flower_url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    return [
        {"messages": _chat("<image>What colour is this?", "Red."), "image": "imgs/red.png"},
        {"messages": _chat([{"type": "image"}, {"type": "text", "text": "Where is this?"}],
                           "A temple in China."), "image": CHINA},
        {"messages": _chat([{"type": "text", "text": "Name the flower: "},
                            {"type": "image_url", "image_url": {"url": flower_url}}],
                           "A dahlia."), "image": None},
        {"messages": _chat("Compare <image> and <image>.", "Blue on white, then a temple."),
         "image": ["imgs/rgba.png", "imgs/china.jpg"]},
        {"messages": _chat("Describe the photo.", "A temple."), "image": "imgs/china.jpg"},
        {"messages": _chat("What is two plus two?", "Four.")},
    ]


def bad_rows() -> list[tuple[dict, str, str]]:
    """(row, field, reason pattern) of each bad-image case."""
    return [
        ({"messages": _chat("<image>What?", "x"), "image": "imgs/missing.png"}, "image",
         r"cannot read image imgs/missing.png"),
        ({"messages": _chat("<image>What?", "x"), "image": "imgs/broken.png"}, "image",
         r"cannot decode image"),
        ({"messages": _chat("<image>What?", "x"), "image": "imgs/empty.png"}, "image",
         r"image is empty \(0 bytes\)"),
        ({"messages": _chat("<image>What?", "x"), "image": "imgs/big.png"}, "image",
         rf"600x600 = 360000 pixels, over max_pixels {MAX_PIXELS}"),
        ({"messages": _chat("<image> and <image>?", "x"), "image": "imgs/red.png"}, "image",
         r"2 image placeholder\(s\) take images from 'image' but it holds 1 image\(s\)"),
    ]


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset(folder: str, rows: list[dict]) -> str:
    """``folder/data.jsonl`` with ``rows`` and the images beside it in ``folder/imgs``."""
    write_images(os.path.join(folder, "imgs"))
    return write_jsonl(os.path.join(folder, "data.jsonl"), rows)


def vlm_cfg(work: str, student: str, train: str, teacher: str | None = None,
            **over) -> Config:
    cfg = Config()
    cfg.model.student_name_or_path = student
    cfg.model.teacher_name_or_path = teacher or student
    cfg.storage.work_dir = work
    for key, value in {"train_dataset_path": train, "input_key": "messages",
                       "image_key": "image", "max_image_pixels": MAX_PIXELS, "eval_ratio": 0.2,
                       "eval_max_samples": 2, "max_len": 1024, "prompt_max_len": 1024,
                       **over}.items():
        cfg.set(key, value)
    return cfg.validate()
