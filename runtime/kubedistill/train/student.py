"""The student and the module FSDP shards: student + algorithm as one root.

``DistillModule.forward(batch, normalizer, weight)`` runs the student's BODY (no [B, T, V]
logits), gathers the final hidden states at ``batch.loss_index`` and hands them with the
lm_head weight to the algorithm. Both happen inside the root's forward, so under FSDP2 the
root's parameters (embeddings, final norm, lm_head, algorithm extras) are gathered for the
body and the loss alike, and their gradients are reduced by the root's backward hooks.

Image-text students (``vlm.model.is_image_text``): the body is the multimodal body
(``model.model``: vision tower, connector, language model; its ``last_hidden_state`` is after
the final norm), run with ``**batch.vision_inputs`` (``mm_token_type_ids`` only where the
body takes it) and the model's own ``position_ids`` ([3, B, T] for M-RoPE); FSDP2 shards
every language-model layer and every vision block. ``freeze_vision_tower`` sets
``requires_grad=False`` on the vision encoder and the connector (the optimizer then holds
no state for them; checkpoints still save their weights).
"""

from __future__ import annotations

import inspect
import os
import shutil
import uuid

import torch
from torch import nn

from kubedistill.algorithms.base import Algorithm, MicroBatch
from kubedistill.config import Config
from kubedistill.errors import ConfigError
from kubedistill.train.fsdp import DistEnv, barrier
from kubedistill.train.lora import apply_lora, base_causal_lm
from kubedistill.vlm.model import (
    auto_model_class,
    is_image_text,
    language_layers,
    vision_blocks,
    vision_modules,
)


class DistillModule(nn.Module):
    """``idle_pixels`` (image-text students): the collated pixels of one blank image. A
    micro-batch without images then runs the vision tower on them and adds
    ``0 * sum(features)`` to the loss, so that every rank runs every vision block's FSDP2
    all-gather (forward) and reduce-scatter (backward) once per micro-batch, whatever
    images its samples have; the loss and gradients do not change."""

    def __init__(self, student: nn.Module, algorithm: Algorithm,
                 idle_pixels: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.student = student
        self.algorithm = algorithm
        self.idle_pixels = idle_pixels
        self._body_takes = set(inspect.signature(self.causal_lm.model.forward).parameters)

    @property
    def causal_lm(self) -> nn.Module:
        return base_causal_lm(self.student)

    def decoder_layers(self) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one: the language model's decoder layers, then
        (image-text students) the vision encoder's blocks."""
        return language_layers(self.causal_lm) + vision_blocks(self.causal_lm)

    def vision_kwargs(self, batch: MicroBatch) -> dict[str, torch.Tensor]:
        """``batch.vision_inputs`` less the keys the body's forward does not name
        (Idefics3 takes no ``mm_token_type_ids``)."""
        return {k: v for k, v in batch.vision_inputs.items() if k in self._body_takes}

    def forward(self, batch: MicroBatch, normalizer: float,
                weight: float = 1.0) -> dict[str, torch.Tensor]:
        """``{"loss": ..., parts...}`` of the algorithm, each multiplied by ``weight``
        (0 for padding micro-batches: same graph and collectives, no contribution)."""
        lm = self.causal_lm
        out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False,
                       **self.vision_kwargs(batch))
        last = out.last_hidden_state
        hidden = last.reshape(-1, last.shape[-1]).index_select(0, batch.loss_index)
        parts = self.algorithm(batch, hidden, lm.get_output_embeddings().weight, normalizer)
        if self.idle_pixels is not None and not any(k.startswith("pixel_")
                                                    for k in batch.vision_inputs):
            parts["loss"] = parts["loss"] + self._idle_vision(last.device)
        if weight != 1.0:
            parts = {k: v * weight for k, v in parts.items()}
        return parts

    def _idle_vision(self, device: torch.device) -> torch.Tensor:
        """``0 * sum`` of the vision features of :attr:`idle_pixels` (see the class doc)."""
        out = self.causal_lm.model.get_image_features(
            **{k: v.to(device) for k, v in self.idle_pixels.items()})
        features = getattr(out, "pooler_output", out)
        features = [features] if isinstance(features, torch.Tensor) else list(features)
        return sum(f.float().sum() for f in features) * 0.0

    def checkpoint_filter(self, key: str) -> bool:
        """Keys of the state dict that belong in checkpoints (the frozen teacher head,
        which the teacher cache already holds, does not)."""
        return ".teacher_head." not in f".{key}"


def resolve_student(cfg: Config, env: DistEnv, local_work_dir: str) -> str:
    """The student reference: ``student_name_or_path``, or a student derived from the
    teacher's layers ``student_from_teacher_layers`` into ``{work_dir}/student_init`` (by
    local rank 0, once; the other ranks wait at a barrier)."""
    m = cfg.model
    if m.student_name_or_path:
        return m.student_name_or_path
    if not (m.student_from_teacher_layers and m.teacher_name_or_path):
        raise ConfigError("set student_name_or_path, or student_from_teacher_layers with "
                          "teacher_name_or_path")
    out = os.path.join(local_work_dir, "student_init")
    if env.local_rank == 0 and not os.path.exists(os.path.join(out, "config.json")):
        from kubedistill.models.derive import derive_student

        tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
        derive_student(m.teacher_name_or_path, m.student_from_teacher_layers, tmp,
                       cache_dir=cfg.storage.model_cache_dir)
        try:
            os.rename(tmp, out)
        except OSError:  # another node derived it first (shared work_dir)
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return out


def load_student(ref: str, cfg: Config, env: DistEnv,
                 ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The student in fp32 (master weights) and train mode, with Liger kernels, gradient
    checkpointing and LoRA as configured, and the full state that :func:`materialize` spreads.

    Only rank 0 reads the weights (into CPU memory); with more ranks the others build the
    model on the meta device and receive their shards from rank 0 after sharding, so no
    rank but 0 ever holds a full copy. Seed first: LoRA's init is rank 0's.
    """
    from transformers import AutoConfig

    from kubedistill.models.loading import resolve_attn_implementation, resolve_model_path

    path = resolve_model_path(ref, cfg.storage.model_cache_dir)
    # attention computes in bf16 under the bf16 mixed-precision policy (always on GPU,
    # kubedistill.train.fsdp.mixed_precision), in float32 otherwise
    compute = torch.bfloat16 if env.device.type == "cuda" or cfg.train.bf16 else torch.float32
    attn = resolve_attn_implementation(cfg.model.attn_implementation, env.device.type, compute)
    remote = cfg.model.trust_remote_code
    auto = auto_model_class(path)
    if env.is_main or env.world_size == 1:
        model = auto.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn, local_files_only=True,
            trust_remote_code=remote)
    else:
        config = AutoConfig.from_pretrained(path, local_files_only=True,
                                            trust_remote_code=remote)
        with torch.device("meta"):
            model = auto.from_config(config, dtype=torch.float32,
                                     attn_implementation=attn, trust_remote_code=remote)
    model.config.use_cache = False
    if cfg.model.freeze_vision_tower:
        freeze_vision_tower(model)
    if cfg.model.use_liger_kernel:
        from kubedistill.train.liger import apply_liger_kernels

        apply_liger_kernels(model, env.device.type)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": cfg.train.gradient_checkpointing_use_reentrant})
    model = apply_lora(model, cfg.model).train()
    # references, not copies: they keep rank 0's full tensors alive through sharding
    full = dict(model.state_dict()) if env.is_main and env.world_size > 1 else {}
    return model, full


def freeze_vision_tower(model: nn.Module) -> None:
    """``requires_grad=False`` on the vision encoder and connector of an image-text model."""
    if not is_image_text(model.config):
        raise ConfigError("freeze_vision_tower is set but the student is not an image-text "
                          "model (its config.json has no vision_config)")
    for module in vision_modules(model):
        module.requires_grad_(False)


def materialize(student: nn.Module, full: dict[str, torch.Tensor], env: DistEnv) -> None:
    """After sharding: fill every rank's shards from rank 0's ``full`` state, and copy
    rank 0's buffers (rotary tables and other non-persistent ones too). Every rank calls
    it; a world of one has nothing to do."""
    if env.world_size == 1:
        return
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not env.is_main:
        student.to_empty(device=env.device)
    set_model_state_dict(student, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    full.clear()
    for buf in student.buffers():
        dist.broadcast(buf, src=0)


def broadcast_state(algorithm: Algorithm, env: DistEnv) -> None:
    """Before sharding: rank 0's algorithm parameters and buffers (not the teacher head,
    which every rank loads itself) to every rank."""
    if env.world_size == 1:
        return
    import torch.distributed as dist

    for name, tensor in [*algorithm.named_parameters(), *algorithm.named_buffers()]:
        if not name.startswith("teacher_head."):
            dist.broadcast(tensor.data, src=0)
