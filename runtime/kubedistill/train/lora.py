"""LoRA through peft: wrap the student before sharding; export merged or as adapters.

``lora_rank > 0`` turns it on with ``lora_alpha``, ``lora_dropout`` and ``target_modules``
(``all-linear`` or a comma-separated list of module names). The base weights are frozen;
only the adapters train (and are sharded by FSDP2 with the rest of each layer).

Image-text models: adapters go on the language model only. The targets become the full
names of the matching ``nn.Linear`` modules under the language model (``all-linear``: every
linear there; a list: those whose last name part is listed), so no vision block, connector
or ``lm_head`` gets one.
"""

from __future__ import annotations

from torch import nn

from kubedistill.config import ModelConfig
from kubedistill.config_values import split_list
from kubedistill.errors import ConfigError
from kubedistill.vlm.model import is_image_text, language_model


def lora_enabled(cfg: ModelConfig) -> bool:
    return cfg.lora_rank > 0


def apply_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``model`` wrapped as a ``PeftModel`` (unchanged when LoRA is off)."""
    if not lora_enabled(cfg):
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules
    targets = targets if targets == "all-linear" else split_list(targets)
    if is_image_text(model.config):
        targets = language_model_targets(model, targets)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                        lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                        target_modules=targets)
    return get_peft_model(model, config)


def language_model_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``model``'s language model that
    ``targets`` (``all-linear`` or last-name parts) selects; see the module doc."""
    lm = language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is lm)
    names = [f"{prefix}.{name}" for name, module in lm.named_modules()
             if isinstance(module, nn.Linear)
             and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)]
    if not names:
        raise ConfigError(f"target_modules {targets!r} names no linear layer of the "
                          "student's language model")
    return names


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a ``PeftModel`` (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def finalize(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """What to save: the merged plain model, or the ``PeftModel`` when saving adapters."""
    if not lora_enabled(cfg) or cfg.lora_save_adapters:
        return model
    return model.merge_and_unload()
