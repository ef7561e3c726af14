"""Image inputs of a micro-batch for image-text students (see docs/vlm.md).

:class:`ImageBatcher` completes a right-padded :class:`MicroBatch` whose samples carry stored
images (the prepared ``images`` column):

- each sample's images are decoded (:func:`kubedistill.data.images.decode_stored`) and turned
  into pixels by the STUDENT's processor (``processor.pixels``, the same tensors prepare's
  ``encode`` gave), then collated ONCE per micro-batch (``processor.collate``: every image of
  every sample exactly once, in sample order; Idefics3 pads the image axis with all-zero
  images, which the model drops);
- ``vision_inputs["mm_token_type_ids"]`` [B, T] is 1 on the image tokens of real positions;
- ``position_ids`` becomes the model's own positions (``positions(batch_dict)``, normally
  :func:`kubedistill.vlm.inputs.position_ids` bound to the student: [3, B, T] M-RoPE
  positions for Qwen2/2.5-VL, ``cumsum(mask) - 1`` otherwise).

Packed rows are not supported (M-RoPE positions would need per-sample ``get_rope_index``
offsets); the trainer refuses ``packing_samples`` with images before building any batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kubedistill.algorithms.base import MicroBatch
from kubedistill.errors import ConfigError


class ImageBatcher:
    """``processor``: an :class:`kubedistill.vlm.processing.ImageTextProcessor`;
    ``positions(batch) -> Tensor`` maps ``{"input_ids", "attention_mask",
    "mm_token_type_ids", <pixels>}`` to the forward's ``position_ids``."""

    def __init__(self, processor, positions: Callable[[dict], torch.Tensor]):
        self.processor = processor
        self.positions = positions

    def idle_pixels(self) -> dict[str, torch.Tensor]:
        """The collated pixels of one blank 56 x 56 image (``DistillModule.idle_pixels``)."""
        from PIL import Image

        return self.processor.collate([self.processor.pixels(
            [Image.new("RGB", (56, 56), (255, 255, 255))])])

    def fill(self, batch: MicroBatch, images: list[list[bytes] | None]) -> None:
        """Set ``batch.vision_inputs`` and ``batch.position_ids`` in place (``images[b]``:
        row ``b``'s stored image bytes, or None for a text row)."""
        from kubedistill.data.images import decode_stored

        if batch.attention_mask is None:
            raise ConfigError("packed micro-batches cannot carry images (packing_samples "
                              "with an image-text dataset); set packing_samples false")
        pixels = [self.processor.pixels(decode_stored(blobs, where=f"sample {sid!r}"))
                  if blobs else {} for sid, blobs in zip(batch.sample_ids, images, strict=True)]
        attn = batch.attention_mask
        mm = ((batch.input_ids == self.processor.image_token_id) & attn.bool()).int()
        vision = {"mm_token_type_ids": mm, **self.processor.collate(pixels)}
        batch.vision_inputs = vision
        batch.position_ids = self.positions({"input_ids": batch.input_ids,
                                             "attention_mask": attn, **vision})


def image_batcher(student, student_path: str, *, trust_remote_code: bool = False,
                  ) -> ImageBatcher | None:
    """The batcher of an image-text ``student`` (its processor from ``student_path``), or
    None for a text model."""
    from kubedistill.vlm.model import is_image_text

    if not is_image_text(student.config):
        return None
    from functools import partial

    from kubedistill.vlm.inputs import position_ids
    from kubedistill.vlm.processing import load_processor

    return ImageBatcher(load_processor(student_path, trust_remote_code=trust_remote_code),
                        partial(position_ids, student))
