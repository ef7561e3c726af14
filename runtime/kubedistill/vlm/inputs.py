"""Model inputs for image-text samples: expanded tokens, loss masks, batches and positions.

One sample is ``(messages, images)`` in the content-part form of
:func:`kubedistill.data.images.attach_images`; the last message is the assistant reply (the
target) and holds no image. :func:`encode_sample` runs the model's own processor, so
``input_ids`` hold the expanded image tokens, and

    prompt_len = len(encode(render(messages[:-1], add_generation_prompt=True)))
    loss_mask[i] = 1  iff  i >= prompt_len  and  input_ids[i] not in structure_token_ids

(``loss_mask[i] = 1`` means token ``i`` is a target, predicted at position ``i - 1``). The
length that ``max_len`` bounds is the expanded length; a longer sample raises
:class:`ExpandedTooLong` (never cut: cutting inside an image block breaks the model's
image-token count). :func:`check_expansion` compares an engine's expansion with the prepared
one and raises :class:`ExpansionMismatch` on any difference.

:func:`collate` right-pads samples into one batch (no packing: each row is one sample, and
each image's pixels appear once). :func:`position_ids` gives the positions a training forward
must pass: for M-RoPE models (Qwen2/2.5-VL; the model has ``get_rope_index``) the model's
own 3-D ``(t, h, w)`` positions, ``[3, batch, seq]``; otherwise the 1-D text positions
``cumsum(attention_mask) - 1``, ``[batch, seq]``; padding gets position 0 in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kubedistill.data.chat import RowError
from kubedistill.errors import ArtifactMismatch
from kubedistill.vlm.processing import ImageTextProcessor


class ExpandedTooLong(RowError):
    """The expanded sample is longer than ``max_len`` (a length-policy event, not a bug)."""


class ExpansionMismatch(ArtifactMismatch):
    """An engine expanded a sample's image tokens differently from prepare."""


@dataclass
class VLMSample:
    input_ids: list[int]
    loss_mask: list[int]
    prompt_len: int
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss_positions(self) -> list[int]:
        """Positions whose next-token prediction is a target (``loss_mask[i + 1] == 1``)."""
        return [i - 1 for i, m in enumerate(self.loss_mask) if m]


def encode_sample(processor: ImageTextProcessor, messages: list[dict[str, Any]], images: list,
                  *, max_len: int | None = None, field: str = "messages") -> VLMSample:
    """Tokens (images expanded), loss mask and pixels of one sample; see the module doc."""
    if not messages or messages[-1].get("role") != "assistant":
        raise RowError(field, "the last message must be the assistant reply")
    if any(p.get("type") == "image" for p in messages[-1]["content"]):
        raise RowError(field, "the assistant reply (the target) cannot hold an image")
    full_ids, pixels = processor.encode(processor.render(messages), images)
    prompt_ids, _ = processor.encode(processor.render(messages[:-1], add_generation_prompt=True),
                                     images)
    plen = len(prompt_ids)
    if full_ids[:plen] != prompt_ids:
        raise RowError(field, "the chat template's prompt is not a token prefix of the full "
                              "conversation; cannot place the loss mask")
    if max_len is not None and len(full_ids) > max_len:
        raise ExpandedTooLong(field, f"{len(full_ids)} tokens with images expanded > max_len "
                                     f"{max_len}")
    structure = processor.structure_token_ids
    mask = [int(i >= plen and t not in structure) for i, t in enumerate(full_ids)]
    return VLMSample(full_ids, mask, plen, pixels)


def check_expansion(prepared_ids: list[int], engine_ids: list[int], *, image_token_id: int,
                    where: str) -> None:
    """Raise :class:`ExpansionMismatch` unless the engine's tokens equal prepare's."""
    if list(prepared_ids) == list(engine_ids):
        return
    first = next((i for i, (a, b) in enumerate(zip(prepared_ids, engine_ids, strict=False)) if a != b),
                 min(len(prepared_ids), len(engine_ids)))
    n_prep = sum(t == image_token_id for t in prepared_ids)
    n_eng = sum(t == image_token_id for t in engine_ids)
    raise ExpansionMismatch(
        f"{where}: the engine's image-token expansion differs from the prepared row "
        f"({len(engine_ids)} vs {len(prepared_ids)} tokens, {n_eng} vs {n_prep} image tokens, "
        f"first difference at position {first}); re-run prepare with this model's processor")


def collate(samples: list[VLMSample], processor: ImageTextProcessor,
            pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``loss_mask``,
    ``mm_token_type_ids`` (1 on image tokens) and the collated pixel tensors."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(samples), width, dtype=torch.long)
    loss = torch.zeros(len(samples), width, dtype=torch.long)
    for j, s in enumerate(samples):
        ids[j, :len(s.input_ids)] = torch.as_tensor(s.input_ids)
        attn[j, :len(s.input_ids)] = 1
        loss[j, :len(s.loss_mask)] = torch.as_tensor(s.loss_mask)
    mm = ((ids == processor.image_token_id) & attn.bool()).int()
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
            "mm_token_type_ids": mm, **processor.collate([s.pixels for s in samples])}


def _rope_owner(model):
    """The submodule that computes M-RoPE indices, or None for 1-D RoPE models."""
    for module in (model, getattr(model, "model", None)):
        if module is not None and hasattr(module, "get_rope_index"):
            return module
    return None


def position_ids(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions a training forward passes (see the module doc)."""
    owner = _rope_owner(model)
    attn = batch["attention_mask"]
    if owner is None:
        return (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)
    positions, _ = owner.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"), attention_mask=attn)
    return positions


def forward_kwargs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything a training forward passes: tokens, mask, pixels and explicit positions."""
    keep = {k: v for k, v in batch.items()
            if k in ("input_ids", "attention_mask") or k.startswith("pixel_")
            or k == "image_grid_thw"}
    return {**keep, "position_ids": position_ids(model, batch)}
