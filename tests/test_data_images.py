"""Images from a row: sources, decoding, hashing, placeholders, and bad images."""

from __future__ import annotations

import base64
import hashlib
import io
import os

import pytest
import sklearn
from PIL import Image

from kubedistill.data.chat import RowError
from kubedistill.data.images import (
    ImageLimits,
    attach_images,
    bad_image_record,
    decode_image,
    load_images,
    text_only,
)

SKLEARN_IMAGES = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
CHINA = os.path.join(SKLEARN_IMAGES, "china.jpg")
FLOWER = os.path.join(SKLEARN_IMAGES, "flower.jpg")


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _png(mode: str, size=(4, 3), color=(255, 0, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_sources_path_relative_bytes_dict_list(tmp_path):
    with open(CHINA, "rb") as f:
        china = f.read()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "c.jpg").write_bytes(china)
    got = load_images(["img/c.jpg", china, {"bytes": None, "path": FLOWER},
                       {"bytes": china, "path": "ignored.jpg"}],
                      base_dir=str(tmp_path), field="image")
    assert [g.sha256 for g in got] == [_sha(CHINA), _sha(CHINA), _sha(FLOWER), _sha(CHINA)]
    assert all(g.image.mode == "RGB" for g in got)
    assert got[0].size == Image.open(CHINA).size == (640, 427)
    assert load_images(None, base_dir=None, field="image") == []
    assert len(load_images(CHINA, base_dir=None, field="image")) == 1  # a single value


def test_fsspec_uri_and_data_url(tmp_path):
    with open(FLOWER, "rb") as f:
        flower = f.read()
    (tmp_path / "f.jpg").write_bytes(flower)
    uri = (tmp_path / "f.jpg").as_uri()
    assert uri.startswith("file://")
    url = "data:image/jpeg;base64," + base64.b64encode(flower).decode()
    got = load_images([uri, url], base_dir="s3://not-used-for-absolute", field="image")
    assert [g.sha256 for g in got] == [_sha(FLOWER)] * 2


def test_rgba_composited_onto_white():
    # fully transparent red -> white; half-transparent red -> pink
    clear = decode_image(_png("RGBA", color=(255, 0, 0, 0)), field="image")
    assert clear.image.mode == "RGB" and clear.image.getpixel((0, 0)) == (255, 255, 255)
    half = decode_image(_png("RGBA", color=(255, 0, 0, 128)), field="image")
    r, g, b = half.image.getpixel((1, 1))
    assert r == 255 and g == b and 120 <= g <= 130  # 255 * (1 - 128/255) = 127
    opaque = decode_image(_png("RGBA", color=(0, 0, 255, 255)), field="image")
    assert opaque.image.getpixel((0, 0)) == (0, 0, 255)
    gray = decode_image(_png("L", color=7), field="image")
    assert gray.image.mode == "RGB" and gray.image.getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("value, match", [
    ("missing.png", r"cannot read image missing\.png"),
    (b"", r"empty"),
    (b"not an image at all", r"cannot decode image"),
    ({"bytes": None, "path": None}, r"neither 'bytes' nor 'path'"),
    (12, r"unsupported image value of type int"),
    ("data:image/png;base64,@@@", r"bad base64"),
])
def test_bad_images(tmp_path, value, match):
    with pytest.raises(RowError, match=match) as info:
        load_images(value, base_dir=str(tmp_path), field="image")
    assert info.value.field == "image"
    record = bad_image_record(info.value, file="data.jsonl", row=3)
    assert record["file"] == "data.jsonl" and record["row"] == 3 and record["field"] == "image"


def test_truncated_image_is_undecodable():
    with open(CHINA, "rb") as f:
        head = f.read()[:2000]
    with pytest.raises(RowError, match="cannot decode image"):
        decode_image(head, field="image")


def test_pixel_limit():
    data = _png("RGB", size=(30, 20), color=(1, 2, 3))
    assert decode_image(data, field="image", limits=ImageLimits(max_pixels=600)).size == (30, 20)
    with pytest.raises(RowError, match=r"30x20 = 600 pixels, over max_pixels 599"):
        decode_image(data, field="image", limits=ImageLimits(max_pixels=599))


def _flat(sample):
    return [[p["type"] if p["type"] == "image" else p["text"] for p in m["content"]]
            for m in sample.messages]


def test_placeholders_in_text_matched_in_order():
    msgs = [{"role": "user", "content": "<image>left<image>right?"},
            {"role": "assistant", "content": "both"}]
    got = attach_images(msgs, [CHINA, FLOWER], base_dir=None, input_field="messages",
                        image_field="image")
    assert _flat(got) == [["image", "left", "image", "right?"], ["both"]]
    assert got.hashes == [_sha(CHINA), _sha(FLOWER)]
    assert text_only(got.messages) == [{"role": "user", "content": "leftright?"},
                                       {"role": "assistant", "content": "both"}]


def test_openai_parts_inline_and_from_column():
    with open(FLOWER, "rb") as f:
        url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "and"},
        {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]}]
    got = attach_images(msgs, CHINA, base_dir=None, input_field="messages", image_field="image")
    assert _flat(got) == [["image", "and", "image"], ["two"]]
    assert got.hashes == [_sha(FLOWER), _sha(CHINA)]  # inline first, then the column's


def test_no_placeholder_puts_images_before_first_user_text():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what?"},
            {"role": "assistant", "content": "a flower"}]
    got = attach_images(msgs, [FLOWER], base_dir=None, input_field="messages",
                        image_field="image")
    assert _flat(got) == [["be brief"], ["image", "what?"], ["a flower"]]


@pytest.mark.parametrize("text, images, match", [
    ("<image><image>x", [CHINA], r"2 image placeholder\(s\) take images from 'image' but it "
                                 r"holds 1 image"),
    ("<image>x", [], r"1 image placeholder\(s\) .* holds 0 image"),
])
def test_count_mismatch_is_a_bad_row(text, images, match):
    msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": "y"}]
    with pytest.raises(RowError, match=match) as info:
        attach_images(msgs, images, base_dir=None, input_field="messages", image_field="image")
    assert info.value.field == "image"


def test_bad_inline_part_names_the_input_field(tmp_path):
    msgs = [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
            {"role": "assistant", "content": "y"}]
    with pytest.raises(RowError, match=r"cannot read image nope\.png") as info:
        attach_images(msgs, None, base_dir=str(tmp_path), input_field="messages",
                      image_field="image")
    assert info.value.field == "messages"
