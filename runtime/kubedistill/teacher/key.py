"""The teacher-cache key of a Config (what the trainer checks a cache against).

- ``teacher_weights`` = sha256 over the teacher's weight files (``*.safetensors``, else
  ``*.bin``/``*.pt``, or the single ``.gguf`` file), sorted by name, of: the file name, its
  byte size, its safetensors header (tensor names, dtypes, shapes, offsets; the first 1 MiB
  for other formats) and 16 blocks of 64 KiB sampled at evenly spaced offsets. It is **not**
  a hash of every byte (that would read hundreds of GB for a large teacher); it catches any
  change of architecture, dtype, file layout or of a full fine-tune, but in principle not an
  edit confined to bytes between the samples.
- ``tokenizer`` = sha256 over the tokenizer files present (``tokenizer.json``,
  ``tokenizer_config.json``, ``tokenizer.model``, ``special_tokens_map.json``,
  ``vocab.json``, ``merges.txt``, ``added_tokens.json``, ``chat_template.jinja``,
  ``chat_template.json``): name + bytes, so the chat template is covered too.
- ``processor`` (image-text teachers only) = sha256 of the teacher processor's JSON config
  (``ImageTextProcessor.config()``: image size, resampling, image-token layout, chat
  template), so a cache built for other pixels is refused; the image bytes themselves are
  covered by ``data`` (``image_sha256`` is part of ``data_hash``).
- ``data`` = ``data_hash`` of ``{prepared_path}/manifest.json``; without a manifest, the
  sha256 of ``train.parquet`` then ``eval.parquet`` bytes (prefixed ``files:``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import struct
from typing import Any

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.models import resolve_model_path
from kubedistill.models.loading import tokenizer_files_hash
from kubedistill.shards.manifest import POSITIONS_POLICY

_SAMPLES, _BLOCK = 16, 1 << 16


def _weight_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.gguf"):
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    return []


def weights_hash(model_path: str) -> str:
    """See the module docstring. ``model_path``: a local HF directory or a weight file."""
    h = hashlib.sha256()
    files = _weight_files(model_path)
    if not files:
        raise FileNotFoundError(f"no weight files found in {model_path}")
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{os.path.basename(name)}\0{size}\0".encode())
        with open(name, "rb") as f:
            if name.endswith(".safetensors"):
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(n))
            else:
                h.update(f.read(1 << 20))
            for i in range(_SAMPLES):
                f.seek(max(0, (size - _BLOCK) * i // max(1, _SAMPLES - 1)))
                h.update(f.read(_BLOCK))
    return h.hexdigest()


def tokenizer_hash(model_path: str) -> str:
    if os.path.isfile(model_path):  # a .gguf file carries its tokenizer inside
        return "gguf:" + weights_hash(model_path)
    return tokenizer_files_hash(model_path)


def data_hash(prepared_path: str) -> str:
    manifest = storage.join(prepared_path, "manifest.json")
    if storage.exists(manifest):
        value = storage.read_json(manifest).get("data_hash")
        if value:
            return str(value)
    h = hashlib.sha256()
    for split in ("train", "eval"):
        uri = storage.join(prepared_path, f"{split}.parquet")
        if storage.exists(uri):
            h.update(storage.sha256_file(uri).encode())
    return "files:" + h.hexdigest()


def expected_cache_key(cfg: Config, model_path: str | None = None) -> dict[str, Any]:
    """The key a teacher cache built from ``cfg`` has (see :mod:`kubedistill.shards.manifest`).

    ``model_path`` skips resolving the teacher reference again when the caller already did.
    """
    path = model_path or resolve_model_path(cfg.model.teacher_name_or_path,
                                            cfg.storage.model_cache_dir)
    key = {"teacher_weights": weights_hash(path), "tokenizer": tokenizer_hash(path),
           "data": data_hash(cfg.prepared_path), "dtype": cfg.cache.cache_dtype,
           "positions_policy": POSITIONS_POLICY, "topk": int(cfg.cache.cache_topk),
           "teacher_signal": cfg.cache.teacher_signal}
    processor = teacher_processor_hash(path, cfg.model.trust_remote_code)
    if processor is not None:
        key["processor"] = processor
    return key


def teacher_processor_hash(model_path: str, trust_remote_code: bool = False) -> str | None:
    """The ``processor`` key part of an image-text teacher (None for a text model)."""
    from kubedistill.vlm.model import is_image_text

    if os.path.isfile(model_path) or not is_image_text(model_path):
        return None
    from kubedistill.data.image_rows import processor_hash
    from kubedistill.vlm.processing import load_processor

    return processor_hash(load_processor(model_path, trust_remote_code=trust_remote_code))
