"""Students derived from a teacher: the teacher's config with fewer decoder layers.

``derive_student(teacher, layers=[0, 6, 12, 18, 24, 29])`` keeps the embeddings, the final
norm, the lm_head and the listed decoder layers (student layer j = teacher layer layers[j]).
With ``init_from_teacher=False`` the same architecture is randomly initialised instead.
Works for decoder-only models whose layers live at ``model.layers.N`` (Llama, Qwen, Gemma,
Mistral families) and for image-text models (``vlm.model.is_image_text``): there only the
LANGUAGE model's layers are dropped (``text_config.num_hidden_layers``); the vision tower,
the connector, the embeddings and the lm_head are kept whole, and the processor files
(image processor, processor config, chat template) are copied with the tokenizer.
"""

from __future__ import annotations

import torch

from kubedistill.errors import ConfigError
from kubedistill.models.loading import (
    copy_processor_files,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from kubedistill.vlm.model import auto_model_class, is_image_text, language_model


def parse_layers(spec: str | list[int]) -> list[int]:
    layers = [int(x) for x in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not layers or sorted(set(layers)) != layers:
        raise ConfigError(f"student layers must be a strictly increasing list, got {spec!r}")
    return layers


def _layers_prefix(model) -> str:
    """``<language model>.layers.``: the state-dict prefix of the decoder layers."""
    lm = language_model(model)
    return next(f"{name}.layers." for name, module in model.named_modules() if module is lm)


def derive_student(teacher_ref: str, layers: str | list[int], out_dir: str, *,
                   init_from_teacher: bool = True, cache_dir: str | None = None) -> str:
    """Write a student HF directory (safetensors + tokenizer) to ``out_dir``; returns it."""
    layers = parse_layers(layers)
    path = resolve_model_path(teacher_ref, cache_dir)
    auto = auto_model_class(path)
    teacher = (auto.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
               if is_image_text(path) else load_causal_lm(teacher_ref, cache_dir=cache_dir))
    t_text = teacher.config.get_text_config()
    n_teacher = t_text.num_hidden_layers
    if layers[-1] >= n_teacher:
        raise ConfigError(f"teacher has {n_teacher} layers; cannot take layer {layers[-1]}")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    text = config.get_text_config()
    text.num_hidden_layers = len(layers)
    if getattr(text, "layer_types", None):
        text.layer_types = [t_text.layer_types[i] for i in layers]
    torch.manual_seed(0)
    student = auto.from_config(config, dtype=torch.float32)
    if init_from_teacher:
        source = teacher.state_dict()
        prefix = _layers_prefix(student)
        mapped = {}
        for key in student.state_dict():
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                key_src = f"{prefix}{layers[int(index)]}.{rest}"
            else:
                key_src = key
            mapped[key] = source[key_src]
        student.load_state_dict(mapped, strict=True)
    student.generation_config = teacher.generation_config
    student.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(teacher_ref, cache_dir=cache_dir).save_pretrained(out_dir)
    if is_image_text(path):
        copy_processor_files(path, out_dir)
    return out_dir
