"""Hugging Face Hub ids (``Qwen/Qwen3-4B``, ``OpenLeecher/lmsys_chat_1m_clean``) as model and
dataset references, as KDFlow takes them, when the network allows.

A reference is a hub id when it has the form ``owner/name``, no scheme, and no such local
path exists. :func:`snapshot` returns the local snapshot directory: from the local HF cache
when it is there (``$HF_HOME`` / ``$HF_HUB_CACHE``; works offline), else downloaded with
``huggingface_hub.snapshot_download``. Models fetch safetensors weights, configs and
tokenizer files only (never pickled weights); datasets fetch the repository's data files.

Failures are one line naming the id:
- offline (``HF_HUB_OFFLINE=1``) and not cached, or the hub unreachable:
  :class:`~kubedistill.errors.ServiceUnavailable`, exit code 5;
- no such repository on the hub, or a model without safetensors weights:
  :class:`~kubedistill.errors.ConfigError`, exit code 2.
"""

from __future__ import annotations

import os
import re

from kubedistill.errors import ConfigError, ServiceUnavailable

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
DATA_EXTS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


def is_hub_id(ref: str | None) -> bool:
    return bool(ref) and HUB_ID.match(ref) is not None and not os.path.exists(ref)


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def snapshot(ref: str, kind: str = "model") -> str:
    """The local snapshot directory of hub repository ``ref`` (``kind``: model | dataset)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    kw = {"repo_type": kind, "allow_patterns": MODEL_FILES if kind == "model" else None}
    try:
        path = snapshot_download(ref, local_files_only=True, **kw)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if offline():
            raise ServiceUnavailable(
                f"{kind} '{ref}' is a Hugging Face Hub id, not in the local HF cache, and "
                "HF_HUB_OFFLINE is set; download it first or give a local path") from None
        try:
            path = snapshot_download(ref, **kw)
        except RepositoryNotFoundError:
            raise ConfigError(f"{kind} '{ref}': no such repository on the Hugging Face Hub "
                              "(nor a local path)") from None
        except Exception as exc:  # connection errors come in many types
            raise ServiceUnavailable(
                f"{kind} '{ref}' is a Hugging Face Hub id and the hub cannot be reached "
                f"({type(exc).__name__}); give a local path or set HF_ENDPOINT") from None
    if kind == "model" and not _has(path, (".safetensors",)):
        raise ConfigError(f"model '{ref}': the hub repository has no safetensors weights "
                          "(kubedistill loads safetensors only)")
    return path


def dataset_files(ref: str, split: str | None) -> list[str]:
    """The data files of hub dataset ``ref`` for ``split``: files named ``{split}-*`` /
    ``{split}.*`` or under a ``{split}/`` folder when there are any, else all of them."""
    root = snapshot(ref, "dataset")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if f.endswith(DATA_EXTS) and not f.startswith("."))
    if not files:
        raise ConfigError(f"dataset '{ref}': the hub repository holds no data files "
                          f"({', '.join(DATA_EXTS)})")
    if split:
        def in_split(p: str) -> bool:
            rel = os.path.relpath(p, root).split(os.sep)
            base = rel[-1]
            return split in rel[:-1] or base.startswith((f"{split}-", f"{split}."))
        chosen = [p for p in files if in_split(p)]
        files = chosen or files
    return files


def _has(root: str, exts: tuple[str, ...]) -> bool:
    return any(f.endswith(exts) for _, _, names in os.walk(root) for f in names)
