"""Load the model a stage evaluates or registers: a full HF directory, or LoRA adapters only.

An adapters-only directory (``adapter_config.json`` and no ``config.json``) is merged into its
base model (``base_model_name_or_path`` from the adapter config when it exists locally, else
``base_ref``, normally ``cfg.model.student_name_or_path``), so callers always get a plain
``transformers`` causal LM.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from kubedistill.errors import ConfigError
from kubedistill.models import load_causal_lm, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)


def is_adapter_dir(path: str) -> bool:
    return (os.path.exists(os.path.join(path, "adapter_config.json"))
            and not os.path.exists(os.path.join(path, "config.json")))


def _base_of(path: str, base_ref: str | None) -> str:
    with open(os.path.join(path, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path")
    if base and (os.path.exists(base) or base.startswith("packaged:")):
        return base
    if base_ref:
        return base_ref
    raise ConfigError(f"{path} holds LoRA adapters only and its base model '{base}' is not "
                      "available locally; set student_name_or_path to the base model")


def load_model(ref: str, *, base_ref: str | None = None, device: str = "cpu",
               dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               cache_dir: str | None = None):
    """``(model, tokenizer, local_dir)`` for ``ref``, merging LoRA adapters when needed."""
    local = resolve_model_path(ref, cache_dir)
    if not os.path.isdir(local) or not is_adapter_dir(local):
        model = load_causal_lm(local, dtype=dtype, device=device,
                               attn_implementation=attn_implementation)
        return model, load_tokenizer(local), local
    from peft import PeftModel

    base = _base_of(local, base_ref)
    log.info("%s holds LoRA adapters; merging them into %s", ref, base)
    model = load_causal_lm(base, dtype=dtype, device=device,
                           attn_implementation=attn_implementation, cache_dir=cache_dir)
    model = PeftModel.from_pretrained(model, local).merge_and_unload().eval()
    has_tok = any(os.path.exists(os.path.join(local, f))
                  for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, load_tokenizer(local if has_tok else base, cache_dir=cache_dir), local
