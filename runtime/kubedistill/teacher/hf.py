"""The ``hf`` teacher engine: transformers on any device, no logits computed.

Runs the base model (``model.base_model``, i.e. ``model.model`` for Llama/Qwen/Gemma), whose
``last_hidden_state`` is already after the final norm, so
``TeacherHead.from_model(model).logits(h) == model(x).logits``. Samples are sorted by length
(longest first) and grouped so that ``rows x longest`` stays within ``batch_tokens``
(a sample longer than the budget runs alone); batches are right-padded with an attention
mask, under ``torch.inference_mode``. Samples with no positions are not run.

Image-text teachers (``processor`` given, an :class:`~kubedistill.vlm.processing.
ImageTextProcessor`): ``images[i]`` are sample i's stored bytes, whose image tokens the
prepared ``sequences[i]`` already hold expanded by this teacher's processor. Each image is
decoded (:func:`~kubedistill.data.images.decode_stored`) and turned into pixels
(``processor.pixels``); before any forward, the number of image tokens those pixels stand
for (:func:`implied_image_tokens`) must equal the number of ``image_token_id`` in the
sequence, else :class:`~kubedistill.vlm.inputs.ExpansionMismatch` naming the sample (never a
truncation). The batch is :func:`kubedistill.vlm.inputs.collate`'s (each image once,
``mm_token_type_ids``) and the states come from
:func:`~kubedistill.teacher.vlm_states.image_text_final_states` (the model's own 3-D M-RoPE
positions). Text rows of an image-text teacher take the same path with no pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kubedistill.errors import ConfigError
from kubedistill.lifecycle import EngineLifecycle


def token_budget_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so that ``len(group) * max_len <= batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def implied_image_tokens(processor, pixels: dict[str, torch.Tensor]) -> int:
    """Image tokens that one sample's pixels expand to in ``processor``'s family.

    M-RoPE families (``image_grid_thw``): ``sum(prod(grid_thw)) / merge_size^2``; Idefics3 /
    SmolVLM: ``crops * image_seq_len`` (``pixel_values [crops, 3, H, W]``)."""
    if not pixels:
        return 0
    if "image_grid_thw" in pixels:
        merge = getattr(processor, "merge", None) or processor.image_processor.merge_size
        return int((pixels["image_grid_thw"].prod(-1) // int(merge) ** 2).sum())
    seq_len = getattr(getattr(processor, "processor", None), "image_seq_len", None)
    if seq_len is None:
        raise ConfigError(f"cannot tell how many image tokens {type(processor).__name__} "
                          "expands an image to; this VLM family is not supported by the hf "
                          "teacher engine yet")
    return int(pixels["pixel_values"].shape[0]) * int(seq_len)


class HFTeacherEngine(EngineLifecycle):
    def __init__(self, model: nn.Module, batch_tokens: int = 4096, processor: Any = None):
        self.model = model.eval()
        self.body = model.base_model
        self.batch_tokens = int(batch_tokens)
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        self.device = next(model.parameters()).device
        self.processor = processor  # an ImageTextProcessor for image-text teachers

    @torch.inference_mode()
    def final_states(self, sequences: Sequence[Sequence[int]],
                     positions: Sequence[Sequence[int]],
                     images: Sequence[Sequence[bytes] | None] | None = None,
                     where: Sequence[str] | None = None) -> list[torch.Tensor]:
        """See :mod:`kubedistill.teacher.engine`; ``where[i]`` names sample i in errors
        (default ``sample i``)."""
        out: list[torch.Tensor] = [torch.zeros(len(p), self.hidden_size) for p in positions]
        todo = [i for i, p in enumerate(positions) if len(p)]
        if self.processor is None and images is not None:
            with_images = next((i for i in todo if images[i]), None)
            if with_images is not None:
                raise ConfigError(f"{_name(where, with_images)} has images but the teacher is "
                                  "a text-only model (no image processor)")
        pixels = self._pixels(sequences, images, todo, where) if self.processor else {}
        for group in token_budget_batches([len(sequences[i]) for i in todo], self.batch_tokens):
            rows = [todo[g] for g in group]
            if self.processor is not None:
                states = self._image_text_states(rows, sequences, positions, pixels)
                for r, h in zip(rows, states, strict=True):
                    out[r] = h
                continue
            width = max(len(sequences[r]) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(sequences[r])] = torch.as_tensor(sequences[r], dtype=torch.long)
                mask[j, :len(sequences[r])] = 1
            hidden = self.body(input_ids=ids.to(self.device),
                               attention_mask=mask.to(self.device)).last_hidden_state
            for j, r in enumerate(rows):
                pos = torch.as_tensor(positions[r], dtype=torch.long, device=hidden.device)
                out[r] = hidden[j].index_select(0, pos).float().cpu()
        return out

    def _pixels(self, sequences, images, todo: list[int], where) -> dict[int, dict]:
        """Pixels of every sample with images, after the image-token count check."""
        from kubedistill.data.images import decode_stored
        from kubedistill.vlm.inputs import ExpansionMismatch

        out: dict[int, dict] = {}
        image_id = self.processor.image_token_id
        for i in todo:
            blobs = images[i] if images is not None else None
            pixels = self.processor.pixels(decode_stored(blobs, where=_name(where, i))) \
                if blobs else {}
            have = int(sum(int(t) == image_id for t in sequences[i]))
            want = implied_image_tokens(self.processor, pixels)
            if have != want:
                raise ExpansionMismatch(
                    f"{_name(where, i)}: its {len(blobs or ())} image(s) expand to {want} image "
                    f"tokens with the teacher's processor, but the prepared tokens hold {have}; "
                    "re-run prepare with this teacher's processor")
            out[i] = pixels
        return out

    def _image_text_states(self, rows, sequences, positions, pixels) -> list[torch.Tensor]:
        from kubedistill.teacher.vlm_states import image_text_final_states
        from kubedistill.vlm.inputs import VLMSample, collate

        samples = [VLMSample([int(t) for t in sequences[r]], [0] * len(sequences[r]), 0,
                             pixels[r]) for r in rows]
        pad = getattr(self.processor.tokenizer, "pad_token_id", None) or 0
        batch = collate(samples, self.processor, pad_id=pad)
        return image_text_final_states(self.model, batch, [positions[r] for r in rows])

    def _shutdown(self) -> None:  # sleep / wake: nothing to release (EngineLifecycle)
        self.model = self.body = None


def _name(where: Sequence[str] | None, i: int) -> str:
    return f"sample {where[i]}" if where is not None else f"sample {i}"
