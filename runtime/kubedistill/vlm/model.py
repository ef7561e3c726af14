"""Which models are image-text models, and where their parts are.

An HF directory is an **image-text model** when its ``config.json`` has a
``vision_config``; it loads with ``AutoModelForImageTextToText`` (text models with
``AutoModelForCausalLM``). The parts, by family (transformers 5 layout):

====================  ==================================  ===================================
family                language-model decoder layers       vision blocks
====================  ==================================  ===================================
Idefics3 / SmolVLM    ``model.text_model.layers``          ``model.vision_model.encoder.layers``
Qwen2-VL / 2.5 / 3    ``model.language_model.layers``      ``model.visual.blocks``
LLaVA-style           ``model.language_model.layers``      ``model.vision_tower...layers``
====================  ==================================  ===================================

:func:`language_layers` and :func:`vision_blocks` find them by these names, so FSDP2 can
shard each block and ``freeze_vision_tower`` can find the tower (:func:`vision_modules`:
the vision encoder and the connector/projector between it and the language model).
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

_LANGUAGE = ("text_model", "language_model")
_VISION = ("vision_model", "visual", "vision_tower")
_CONNECTOR = ("connector", "multi_modal_projector")  # Qwen2-VL: the merger is in ``visual``


def config_dict(path: str) -> dict[str, Any] | None:
    """``config.json`` of a local HF directory, or None (a file, a hub id, no config)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if file is None or not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f)


def is_image_text(path_or_config: str | Any) -> bool:
    """True for an image-text model (a directory path, or a loaded ``PretrainedConfig``)."""
    if isinstance(path_or_config, str):
        config = config_dict(path_or_config)
        return bool(config and config.get("vision_config"))
    return getattr(path_or_config, "vision_config", None) is not None


def auto_model_class(path_or_config: str | Any):
    """``AutoModelForImageTextToText`` for image-text models, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_image_text(path_or_config) else AutoModelForCausalLM


def _body(model: nn.Module) -> nn.Module:
    """The multimodal body: ``model.model`` of a ``...ForConditionalGeneration``."""
    return getattr(model, "model", model)


def language_model(model: nn.Module) -> nn.Module:
    body = _body(model)
    for name in _LANGUAGE:
        if hasattr(body, name):
            return getattr(body, name)
    return body


def language_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of the language model (text models: ``model.model.layers``)."""
    return list(language_model(model).layers)


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The vision encoder and the connector (empty for a text model)."""
    body = _body(model)
    return [getattr(body, n) for n in (*_VISION, *_CONNECTOR) if hasattr(body, n)]


def vision_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the vision encoder, in order (empty for a text model)."""
    for tower in vision_modules(model)[:1]:
        for owner in (tower, getattr(tower, "encoder", None),
                      getattr(getattr(tower, "vision_model", None), "encoder", None)):
            for name in ("blocks", "layers"):
                blocks = getattr(owner, name, None) if owner is not None else None
                if isinstance(blocks, nn.ModuleList):
                    return list(blocks)
    return []
