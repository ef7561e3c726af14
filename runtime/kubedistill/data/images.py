"""Images of one row: where they come from, how they are decoded, and how they meet the text.

Sources (``image_key`` is the data config's column name):

==========================  ==============================================================
``row[image_key]``          a path (relative to the dataset file's folder, or an fsspec URI
                            such as ``s3://b/x.png``), raw ``bytes``, a ``{"bytes", "path"}``
                            dict as HF ``datasets`` writes an ``Image`` column (bytes win
                            when both are set), or a list of these
content parts               OpenAI-style ``{"type": "image"}`` / ``{"type": "image_url",
                            "image_url": {"url": ...}}`` next to ``{"type": "text"}``; a part
                            may carry its own source (``"image"``/``"url"``/``"path"``, a
                            ``data:image/...;base64,`` URL included) or take the next image
                            of ``row[image_key]``
``<image>`` in text         KDFlow's placeholder; each takes the next image of the column
==========================  ==============================================================

Images are matched to placeholders in reading order. The count of placeholders that take an
image from the column must equal the column's image count; when the text has no placeholder
at all, the column's images go, in order, before the text of the first user turn (the usual
layout of captioning and VQA sets). Every message comes out as a list of content parts
``[{"type": "image"}, {"type": "text", "text": ...}]``, the form every VLM chat template
reads, so each model's own processor expands the image tokens.

Decoding: PIL, then RGB; an image with transparency (RGBA, LA, P with a transparent colour)
is composited onto white, ``rgb = alpha * c + (1 - alpha) * 255``. ``sha256`` is taken over
the image file's bytes as stored. A bad image raises :class:`RowError` naming the field:
missing or unreadable file, empty, undecodable, more than ``ImageLimits.max_pixels`` pixels,
or a count that does not match the placeholders; :func:`bad_image_record` turns it into the
prepare stage's bad-row record (file, row, field, reason).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
from dataclasses import dataclass
from typing import Any

from kubedistill import storage
from kubedistill.data.chat import RowError
from kubedistill.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_OBJECT_ADDRESS = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


@dataclass(frozen=True)
class ImageLimits:
    """``max_pixels``: width x height above which an image is a bad row (decompression
    bombs and accidental posters), checked from the header before the pixels are read."""

    max_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class DecodedImage:
    """One image: RGB pixels, the sha256 of its stored bytes, and the bytes themselves."""

    image: Any  # PIL.Image.Image, mode "RGB"
    sha256: str
    data: bytes

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass(frozen=True)
class ImageSample:
    """A conversation whose messages are content-part lists, and its images in order."""

    messages: list[dict[str, Any]]
    images: list[DecodedImage]

    @property
    def hashes(self) -> list[str]:
        return [im.sha256 for im in self.images]


def bad_image_record(exc: RowError, *, file: str, row: int) -> dict[str, Any]:
    """The bad-row record of a :class:`RowError` from this module (``prepare``'s shape)."""
    return {"file": file, "row": row, "field": exc.field, "reason": exc.reason}


# ---- reading one source ------------------------------------------------------------------
def read_image_bytes(value: Any, *, base_dir: str | None, field: str) -> bytes:
    """The stored bytes of one image source (path, URI, data URL, bytes, datasets dict)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise RowError(field, "image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        data = _read_string_source(value, base_dir=base_dir, field=field)
    else:
        raise RowError(field, f"unsupported image value of type {type(value).__name__}")
    if not data:
        raise RowError(field, "image is empty (0 bytes)")
    return data


def _read_string_source(value: str, *, base_dir: str | None, field: str) -> bytes:
    if _DATA_URL.match(value):
        try:
            return base64.b64decode(value.split(",", 1)[1], validate=True)
        except ValueError as exc:
            raise RowError(field, f"bad base64 in data URL: {exc}") from exc
    if not value.strip():
        raise RowError(field, "image path is empty")
    path = value
    if base_dir and not _URI.match(value) and not os.path.isabs(value):
        path = storage.join(base_dir, value)
    try:
        return storage.read_bytes(path)
    except (OSError, ValueError) as exc:
        raise RowError(field, f"cannot read image {value}: {exc}") from exc


def decode_image(data: bytes, *, field: str, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Decode ``data`` to RGB (transparency composited onto white) and hash it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > limits.max_pixels:
                raise RowError(field, f"image is {width}x{height} = {width * height} pixels, "
                                      f"over max_pixels {limits.max_pixels}")
            probe.load()
            rgb = to_rgb(probe)
    except RowError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        detail = _OBJECT_ADDRESS.sub("the image bytes", str(exc))  # same text on every run
        raise RowError(field, f"cannot decode image: {type(exc).__name__}: {detail}") from exc
    if width == 0 or height == 0:
        raise RowError(field, "image has no pixels")
    return DecodedImage(rgb, hashlib.sha256(data).hexdigest(), data)


def to_rgb(image):
    """``image`` as RGB; transparency is composited onto a white background."""
    from PIL import Image

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_images(value: Any, *, base_dir: str | None, field: str,
                limits: ImageLimits = ImageLimits()) -> list[DecodedImage]:
    """All images of a column value (one source or a list; None -> no images)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [decode_image(read_image_bytes(v, base_dir=base_dir, field=field), field=field,
                         limits=limits) for v in items]


# ---- matching images to the text ---------------------------------------------------------
_IMAGE_PART_TYPES = ("image", "image_url")


def _inline_source(part: dict[str, Any]) -> Any:
    """The image a content part carries itself, or None when it takes the column's next."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None


def _as_parts(content: Any, field: str) -> list[dict[str, Any]]:
    """Content (a string or a list of parts) as parts, ``<image>`` split into image parts."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RowError(field, f"message content must be a string or a list of parts, not "
                              f"{type(content).__name__}")
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            for piece in _PLACEHOLDER_SPLIT.split(str(part.get("text", ""))):
                if piece == IMAGE_PLACEHOLDER:
                    parts.append({"type": "image"})
                elif piece:
                    parts.append({"type": "text", "text": piece})
        elif kind in _IMAGE_PART_TYPES:
            parts.append(dict(part))
        else:
            raise RowError(field, f"unsupported content part {part!r:.80}")
    return parts


def attach_images(messages: list[dict[str, Any]], column_value: Any, *, base_dir: str | None,
                  input_field: str, image_field: str | None,
                  limits: ImageLimits = ImageLimits()) -> ImageSample:
    """Messages as content parts with one ``{"type": "image"}`` per image, and the images.

    Raises :class:`RowError` (``image_field`` for column problems, ``input_field`` for
    inline parts) for any bad image or a placeholder count that does not match."""
    column = load_images(column_value, base_dir=base_dir, field=image_field or input_field,
                         limits=limits)
    converted = [{**m, "content": _as_parts(m.get("content"), input_field)} for m in messages]
    slots = [p for m in converted for p in m["content"] if p["type"] != "text"]
    if not slots and column:
        return ImageSample(_prepend_to_first_user(converted, len(column), input_field),
                           list(column))
    wanted = sum(_inline_source(p) is None for p in slots)
    if wanted != len(column):
        raise RowError(image_field or input_field,
                       f"{wanted} image placeholder(s) take images from "
                       f"'{image_field or 'image_key'}' but it "
                       f"holds {len(column)} image(s)")
    pending = iter(column)
    images = []
    for part in slots:
        source = _inline_source(part)
        images.append(next(pending) if source is None else decode_image(
            read_image_bytes(source, base_dir=base_dir, field=input_field), field=input_field,
            limits=limits))
    for message in converted:
        message["content"] = [p if p["type"] == "text" else {"type": "image"}
                              for p in message["content"]]
    return ImageSample(converted, images)


def _prepend_to_first_user(messages: list[dict[str, Any]], count: int,
                           field: str) -> list[dict[str, Any]]:
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            parts = [{"type": "image"} for _ in range(count)] + message["content"]
            return messages[:i] + [{**message, "content": parts}] + messages[i + 1:]
    raise RowError(field, "images given but the conversation has no user turn to hold them")


def text_only(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The messages with string content and image parts dropped (for text-only models)."""
    return [{**m, "content": "".join(p.get("text", "") for p in m["content"]
                                     if p["type"] == "text")} for m in messages]


def decode_stored(blobs: list[bytes] | None, *, where: str) -> list:
    """The RGB images of a prepared row's ``images`` column (already checked by prepare, so
    no pixel limit); ``where`` names the row in the error of a corrupted store."""
    try:
        return [decode_image(b, field="images", limits=ImageLimits(1 << 62)).image
                for b in blobs or ()]
    except RowError as exc:
        raise DataError(f"{where}: stored image cannot be decoded ({exc.reason})") from exc
