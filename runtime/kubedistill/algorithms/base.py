"""The contract between the trainer and a distillation algorithm.

The trainer runs the student's BODY only (``model.model``: no [B, T, V] logits), gathers the
final hidden states at the loss positions into ``hidden`` [N, d], and hands them, with the
student's lm_head weight, to the algorithm. An algorithm returns

    {"loss": sum_over_tokens(per_token_loss) / normalizer, <part>: ..., ...}

where ``normalizer`` is the GLOBAL number of loss tokens of the optimizer step (all ranks,
all micro-batches), so gradients do not depend on micro-batch size or world size. ``loss``
carries the gradient; other parts are detached, normalised the same way, for logging.

An algorithm is an ``nn.Module``: trainable extras (e.g. DSKD projectors) are its parameters,
get their own optimizer group from :meth:`Algorithm.param_groups`, and are saved in
checkpoints through its ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MicroBatch:
    """One micro-batch as the trainer feeds it to the student and the algorithm.

    ``loss_index`` are flat indexes into the ``B * T`` positions whose NEXT token is a
    training target; ``target_ids[i]`` is that next token. ``teacher_hidden[i]`` is the
    teacher's final post-norm hidden state at the position that predicts the same target
    (same-tokenizer algorithms: rows line up one to one with ``loss_index``).

    Image-text students: ``vision_inputs`` holds the extra forward inputs of the batch's
    images (``pixel_values``, ``pixel_attention_mask`` / ``image_grid_thw`` as the family
    has them, each image once) and ``mm_token_type_ids`` [B, T] (1 on image tokens);
    ``position_ids`` is then the model's own positions ([3, B, T] for M-RoPE models).
    """

    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] (M-RoPE: [3, B, T]) long; restarts per packed sample
    attention_mask: torch.Tensor | None  # [B, T]; None for packed rows
    loss_index: torch.Tensor  # [N] long, into B*T
    target_ids: torch.Tensor  # [N] long
    teacher_hidden: torch.Tensor | None = None  # [N, d_teacher]
    teacher_topk_logprobs: torch.Tensor | None = None  # [N, k]
    teacher_topk_ids: torch.Tensor | None = None  # [N, k]
    sample_ids: list[str] = field(default_factory=list)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # algorithm-specific inputs
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # see the class doc

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_index.numel())

    @property
    def num_tokens(self) -> int:
        if self.attention_mask is None:
            return int(self.input_ids.numel())
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> MicroBatch:
        def move(x):
            return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x

        return MicroBatch(**{k: ({n: move(v) for n, v in val.items()} if isinstance(val, dict)
                                 else move(val)) for k, val in self.__dict__.items()})


class Algorithm(nn.Module):
    """Base class; subclasses set ``needs_teacher`` and implement :meth:`forward`.

    ``config`` is the whole :class:`kubedistill.config.Config`. ``teacher_head`` (a frozen
    ``TeacherHead``) is a submodule, so ``.to(device)`` moves it, but it is left out of
    ``state_dict`` (checkpoints hold only the algorithm's own state) and ignored by
    ``load_state_dict``. ``name`` is set by ``@register_algorithm``.
    """

    needs_teacher: bool = True
    name: str = ""

    def __init__(self, config, teacher_head: nn.Module | None = None,
                 student_hidden_size: int | None = None):
        super().__init__()
        self.config = config
        self.teacher_head = teacher_head
        self.register_state_dict_post_hook(_drop_teacher_head)
        self.register_load_state_dict_post_hook(_ignore_missing_teacher_head)

    def init_from_student(self, student_head: torch.Tensor | None) -> None:
        """Called once by the trainer, before sharding, with the student's lm_head weight
        [V_s, d_s] as training starts (``None`` on ranks that do not hold it; rank 0's
        parameters and buffers are then broadcast). Default: nothing to do."""

    def param_groups(self) -> list[dict]:
        """Extra optimizer parameter groups (e.g. projectors with their own lr)."""
        return []

    def forward(self, batch: MicroBatch, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                normalizer: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _drop_teacher_head(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "teacher_head.")]:
        del state_dict[key]


def _ignore_missing_teacher_head(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if "teacher_head." not in k]
