"""Load single submodules (lm_head, final norm) of a checkpoint without the whole model.

The model is built on the ``meta`` device from its config (no memory, no weights), the wanted
submodule is picked, and only its tensors are read from the ``*.safetensors`` files, under any
of the names the parameter has (tied weights have several, e.g. ``model.embed_tokens.weight``
and ``lm_head.weight``). Used where the body runs elsewhere (SGLang) and for large teachers.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import nn


def meta_model(model_path: str, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoConfig

    from kubedistill.vlm.model import auto_model_class

    config = AutoConfig.from_pretrained(model_path, local_files_only=True,
                                        trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # image-text models: AutoModelForImageTextToText
        return auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)


def _saved_names(name: str) -> list[str]:
    """Names a checkpoint may store ``name`` under when transformers renamed it on save
    (Qwen2-VL writes ``model.language_model.norm.weight`` as ``model.norm.weight``): the
    name's tails, each also under ``model.``; tried only when the exact name is absent."""
    parts = name.split(".")
    tails = [".".join(parts[i:]) for i in range(1, len(parts))]
    return [t for tail in tails for t in ("model." + tail, tail)]


def load_submodule(model_path: str, pick: Callable[[nn.Module], nn.Module],
                   trust_remote_code: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(meta model, submodule with real CPU weights)`` for ``pick(model)``."""
    model = meta_model(model_path, trust_remote_code)
    sub = pick(model)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    wanted = {local: names.get(id(p), []) for local, p in sub.named_parameters()}
    found: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(model_path, "*.safetensors"))):
        with safe_open(file, "pt") as f:
            keys = set(f.keys())
            for local, candidates in wanted.items():
                hit = next((c for c in candidates if c in keys), None) or next(
                    (a for c in candidates for a in _saved_names(c) if a in keys), None)
                if hit and local not in found:
                    found[local] = f.get_tensor(hit)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise FileNotFoundError(f"{model_path}: no tensors for {missing} of {type(sub).__name__}")
    sub.load_state_dict(found, strict=False, assign=True)
    return model, sub
