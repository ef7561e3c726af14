"""Students derived from a teacher: the teacher's config with fewer decoder layers.

``derive_student(teacher, layers=[0, 6, 12, 18, 24, 29])`` keeps the embeddings, the final
norm, the lm_head and the listed decoder layers (student layer j = teacher layer layers[j]).
With ``init_from_teacher=False`` the same architecture is randomly initialised instead.
Works for decoder-only models whose layers live at ``model.layers.N`` (Llama, Qwen, Gemma,
Mistral families).
"""

from __future__ import annotations

import re

import torch

from kubedistill.errors import ConfigError
from kubedistill.models.loading import load_causal_lm, load_tokenizer

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def parse_layers(spec: str | list[int]) -> list[int]:
    layers = [int(x) for x in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not layers or sorted(set(layers)) != layers:
        raise ConfigError(f"student layers must be a strictly increasing list, got {spec!r}")
    return layers


def derive_student(teacher_ref: str, layers: str | list[int], out_dir: str, *,
                   init_from_teacher: bool = True, cache_dir: str | None = None) -> str:
    """Write a student HF directory (safetensors + tokenizer) to ``out_dir``; returns it."""
    from transformers import AutoModelForCausalLM

    layers = parse_layers(layers)
    teacher = load_causal_lm(teacher_ref, cache_dir=cache_dir)
    n_teacher = teacher.config.num_hidden_layers
    if layers[-1] >= n_teacher:
        raise ConfigError(f"teacher has {n_teacher} layers; cannot take layer {layers[-1]}")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher.config.layer_types[i] for i in layers]
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if init_from_teacher:
        source = teacher.state_dict()
        mapped = {}
        for key in student.state_dict():
            match = _LAYER.match(key)
            src = f"{match[1]}{layers[int(match[2])]}{match[3]}" if match else key
            mapped[key] = source[src]
        student.load_state_dict(mapped, strict=True)
    student.generation_config = teacher.generation_config
    student.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(teacher_ref, cache_dir=cache_dir).save_pretrained(out_dir)
    return out_dir
