"""The ``TeacherEngine`` protocol and backend selection.

A teacher engine turns token-id sequences into the teacher's **final post-norm hidden
states** (the input of the lm_head) at requested positions:

    engine.final_states(sequences, positions, images=None) -> [Tensor[len(positions[i]), d] ...]

``sequences[i]`` is the i-th sample's teacher token ids and ``positions[i]`` the 0-based
positions to keep; ``images[i]`` (image-text teachers) the sample's stored image bytes in
order (None or [] for a text row), whose image tokens ``sequences[i]`` already holds expanded
by the teacher's own processor (an engine that expands differently raises
``ExpansionMismatch``); the result is float32 on the CPU, one tensor per sample, in input order.
Backends: ``hf`` (:mod:`kubedistill.teacher.hf`, transformers, any device) and ``sglang``
(:mod:`kubedistill.teacher.sglang`, GPU). ``auto`` picks sglang when CUDA is available and
sglang imports, else hf.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from kubedistill.config import Config
from kubedistill.errors import ConfigError


@runtime_checkable
class TeacherEngine(Protocol):
    hidden_size: int

    def final_states(self, sequences: Sequence[Sequence[int]],
                     positions: Sequence[Sequence[int]],
                     images: Sequence[Sequence[bytes] | None] | None = None,
                     ) -> list[torch.Tensor]:
        """Hidden states ``[len(positions[i]), d]`` (float32, CPU) for each sample."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (only when awake; see kubedistill.lifecycle)."""
        ...

    def wake(self) -> None:
        """Resume it (only when asleep)."""
        ...

    def close(self) -> None:
        ...


def resolve_backend(name: str) -> str:
    """``auto`` -> ``sglang`` when CUDA is available and sglang imports, else ``hf``."""
    if name == "auto":
        has_sglang = importlib.util.find_spec("sglang") is not None
        return "sglang" if torch.cuda.is_available() and has_sglang else "hf"
    if name not in ("hf", "sglang"):
        raise ConfigError(f"teacher_backend must be auto, hf or sglang, got '{name}'")
    return name


def resolve_device(cfg: Config) -> str:
    device = cfg.train.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def make_engine(cfg: Config, model_path: str, model: torch.nn.Module | None = None,
                ) -> TeacherEngine:
    """The engine ``cfg.cache.teacher_backend`` asks for (``model``: an already loaded
    transformers teacher, reused by the hf backend)."""
    backend = resolve_backend(cfg.cache.teacher_backend)
    if backend == "sglang":
        from kubedistill.teacher.sglang import SGLangTeacherEngine

        return SGLangTeacherEngine.from_config(cfg, model_path)
    from kubedistill.teacher.hf import HFTeacherEngine

    if model is None:
        model = load_hf_teacher(cfg, model_path)
    return HFTeacherEngine(model, batch_tokens=cfg.cache.teacher_batch_tokens,
                           processor=teacher_processor(cfg, model_path))


def teacher_processor(cfg: Config, model_path: str):
    """The image-text processor of an image-text teacher (None for a text model)."""
    from kubedistill.vlm.model import is_image_text

    if not is_image_text(model_path):
        return None
    from kubedistill.vlm.processing import load_processor

    return load_processor(model_path, trust_remote_code=cfg.model.trust_remote_code)


def load_hf_teacher(cfg: Config, model_path: str) -> torch.nn.Module:
    """The teacher in eval mode: ``AutoModelForImageTextToText`` for an image-text model
    (:func:`kubedistill.vlm.model.auto_model_class`), else ``AutoModelForCausalLM``."""
    from kubedistill.models import load_causal_lm
    from kubedistill.models.loading import resolve_attn_implementation
    from kubedistill.vlm.model import auto_model_class, is_image_text

    device = resolve_device(cfg)
    dtype = torch.float32 if device == "cpu" or cfg.cache.cache_dtype == "fp32" \
        else torch.bfloat16
    if is_image_text(model_path):
        model = auto_model_class(model_path).from_pretrained(
            model_path, dtype=dtype, local_files_only=True,
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=resolve_attn_implementation(cfg.model.attn_implementation,
                                                            device, dtype))
        return model.to(device).eval()
    return load_causal_lm(model_path, dtype=dtype, device=device,
                          attn_implementation=cfg.model.attn_implementation,
                          trust_remote_code=cfg.model.trust_remote_code)
