"""Image inputs of the evaluate stage for image-text models (docs/vlm.md).

:class:`EvalImages` binds one model's processor (``vlm.processing.load_processor`` of that
model's directory: the student's for the student, the teacher's for the teacher) to the eval
rows. For a right-padded :class:`~kubedistill.evaluate.scoring.Batch` it gives the forward's
keyword arguments: the rows' stored images (the prepared ``images`` column) decoded
(:func:`kubedistill.data.images.decode_stored`), turned into each row's pixels
(``processor.pixels``: what prepare's ``encode`` gave), collated once per batch
(``processor.collate``: every image once), and the model's own positions
(:func:`kubedistill.vlm.inputs.forward_kwargs`: 3-D M-RoPE for Qwen2-VL). Text rows of an
image dataset carry no pixels. Each row's pixels are computed once and reused by every pass
over the split (CE/KL scoring and generation).

:meth:`EvalImages.generate` is greedy generation with the pixels: the ``hf`` rollout engine
(:class:`kubedistill.rollout.hf.HFRolloutEngine`) at temperature 0, which left-pads the
prompts, passes each prompt's images once and stops at the model's end-of-turn tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kubedistill.errors import DataError


class EvalImages:
    def __init__(self, processor, rows: Sequence[dict]):
        self.processor = processor
        self.rows = rows
        self._pixels: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def for_model(cls, model_dir: str, rows: Sequence[dict], *,
                  trust_remote_code: bool = False) -> EvalImages | None:
        """The images of ``rows`` for the model at ``model_dir``, or None for a text model
        (then every row must be a text row)."""
        from kubedistill.vlm.model import is_image_text

        if not is_image_text(model_dir):
            with_images = [r["id"] for r in rows if r.get("images")]
            if with_images:
                raise DataError(f"eval sample {with_images[0]!r} (and {len(with_images) - 1} "
                                f"more) has images but {model_dir} is not an image-text model "
                                "(its config.json has no vision_config)")
            return None
        from kubedistill.vlm.processing import load_processor

        return cls(load_processor(model_dir, trust_remote_code=trust_remote_code), rows)

    def pixels(self, row: int) -> dict[str, torch.Tensor]:
        """Row ``row``'s pixel tensors ({} for a text row)."""
        if row not in self._pixels:
            from kubedistill.data.images import decode_stored

            blobs = self.rows[row].get("images")
            self._pixels[row] = self.processor.pixels(decode_stored(
                blobs, where=f"eval sample {self.rows[row]['id']!r}")) if blobs else {}
        return self._pixels[row]

    def forward_inputs(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Tokens, mask, the collated pixels of ``rows`` (batch order) and the positions."""
        from kubedistill.vlm.inputs import forward_kwargs

        mm = ((input_ids == self.processor.image_token_id) & attention_mask.bool()).int()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "mm_token_type_ids": mm,
                 **self.processor.collate([self.pixels(r) for r in rows])}
        return forward_kwargs(model, batch)

    def generate_ids(self, model, prompts: Sequence[Sequence[int]], rows: Sequence[int], *,
                     max_new_tokens: int, batch_size: int) -> list[list[int]]:
        """Greedy continuations (token ids, cut after the first stop token) of ``prompts``,
        prompt ``i`` with row ``rows[i]``'s images."""
        from kubedistill.rollout.hf import HFRolloutEngine

        engine = HFRolloutEngine(model, batch_size=batch_size, processor=self.processor)
        samples = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                                  images=[self.rows[r].get("images") for r in rows])
        return [s.response_ids for s in samples]

    def generate(self, model, tokenizer, prompts: Sequence[Sequence[int]], rows: Sequence[int],
                 *, max_new_tokens: int, batch_size: int) -> list[str]:
        """:meth:`generate_ids` decoded without special tokens."""
        ids = self.generate_ids(model, prompts, rows, max_new_tokens=max_new_tokens,
                                batch_size=batch_size)
        return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
