"""The final model: an HF directory (safetensors + config + tokenizer) that transformers,
SGLang and vLLM load as they are, published so that readers never see half of it.
An image-text student is rebuilt with ``AutoModelForImageTextToText`` and its directory
also gets the student's processor files (image processor, processor config, chat template),
so ``AutoModelForImageTextToText`` + ``vlm.processing.load_processor`` reload it.

Every rank takes part in gathering the full state dict; rank 0 loads it into a fresh CPU
copy of the student (plus LoRA adapters), merges LoRA unless ``lora_save_adapters`` (then
the directory holds ``adapter_model.safetensors`` + ``adapter_config.json``, which
transformers loads through peft), writes ``{dir}.partial`` and renames it into place; an
fsspec ``save_path`` is then uploaded. ``train_summary.json`` is written into the
directory LAST, so its presence means the export is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.models.loading import copy_processor_files, load_tokenizer, resolve_model_path
from kubedistill.train.fsdp import DistEnv, barrier, full_state_dict
from kubedistill.train.lora import apply_lora, finalize
from kubedistill.vlm.model import auto_model_class, is_image_text

SUMMARY = "train_summary.json"


def export_hf(student: nn.Module, student_ref: str, cfg: Config, env: DistEnv) -> str:
    """Write the final model to ``cfg.train.save_path``; every rank calls it."""
    state = full_state_dict(student)
    save_path = cfg.train.save_path
    if env.is_main:
        local = storage.local_path(save_path) if storage.is_local(save_path) \
            else tempfile.mkdtemp(prefix="kubedistill-export-")
        local = local.rstrip("/")
        partial = f"{local}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_hf_model(state, student_ref, cfg, partial)
        if os.path.exists(local):
            shutil.rmtree(local)
        os.replace(partial, local)
        if not storage.is_local(save_path):
            fs, remote = storage.filesystem(save_path)
            if fs.exists(remote):  # no stale files of an earlier export in the new one
                fs.rm(remote, recursive=True)
            storage.upload_dir(local, save_path)
            shutil.rmtree(local, ignore_errors=True)
    barrier()
    return save_path


def write_hf_model(state: dict[str, torch.Tensor], student_ref: str, cfg: Config,
                   out_dir: str) -> None:
    """Write ``state`` (the student's full state dict, LoRA keys included) as an HF dir."""
    path = resolve_model_path(student_ref, cfg.storage.model_cache_dir)
    model = auto_model_class(path).from_pretrained(
        path, dtype=torch.float32, local_files_only=True,
        trust_remote_code=cfg.model.trust_remote_code)
    model = apply_lora(model, cfg.model)
    model.load_state_dict(state, strict=True)
    model = finalize(model, cfg.model)
    if cfg.train.bf16:
        model = model.to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code).save_pretrained(out_dir)
    if is_image_text(path):
        copy_processor_files(path, out_dir)


def write_summary(save_path: str, summary: dict[str, Any]) -> None:
    storage.write_json_atomic(storage.join(save_path, SUMMARY), summary)
