"""Each model's own image-text processor behind one small interface.

``load_processor(model_dir)`` returns an :class:`ImageTextProcessor`:

- ``render(messages, add_generation_prompt)``: the chat template applied to content-part
  messages (one ``{"type": "image"}`` per image), giving text with the family's image marker;
- ``encode(text, images)``: ``input_ids`` with every image expanded to its image tokens, plus
  the pixel tensors of this one sample (no batch dimension of its own);
- ``pixels(images)``: the pixel tensors of one sample alone (equal to what ``encode`` gives
  with the same images), for readers of prepared rows whose tokens are already expanded;
- ``collate(pixels)``: the pixel tensors of several samples as the model's forward takes them;
- ``structure_token_ids``: the ids that belong to images (the expanded image token and the
  markers around it); loss masks never cover them;
- ``config()``: the JSON-able processor configuration (for cache keys).

Families: ``AutoProcessor`` wherever it loads (Idefics3/SmolVLM, LLaVA, ...; remote code
only when asked). Qwen2-VL and Qwen2.5-VL use :class:`PadExpandingProcessor` always, so the
expansion is the same with or without torchvision: the tokenizer and the PIL image processor,
and ``<|image_pad|>`` repeated ``prod(image_grid_thw) / merge_size^2`` times.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

_PAD_EXPANDING = {"qwen2_vl", "qwen2_5_vl"}


class ImageTextProcessor:
    """The interface; subclasses set ``tokenizer``, ``image_token_id``, ``structure_tokens``."""

    tokenizer: Any
    image_token_id: int
    structure_tokens: tuple[str, ...] = ()

    @property
    def structure_token_ids(self) -> set[int]:
        ids = {self.tokenizer.convert_tokens_to_ids(t) for t in self.structure_tokens}
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return (ids - {unk}) | {self.image_token_id}

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, images: list) -> tuple[list[int], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def pixels(self, images: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def collate(self, pixels: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


class AutoImageTextProcessor(ImageTextProcessor):
    """``AutoProcessor``'s processor: one call expands the image tokens and makes pixels.

    Pixels per sample are ``pixel_values [n_images, 3, H, W]`` (+ ``pixel_attention_mask``
    ``[n_images, H, W]`` where the family has one); :meth:`collate` pads the image axis with
    all-zero images, which Idefics3 drops (it keeps images with any non-zero value)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = int(processor.image_token_id)
        self.structure_tokens = tuple(t for t in (
            getattr(processor, "fake_image_token", None), getattr(processor, "global_image_tag",
                                                                  None),
            getattr(processor, "image_token", None)) if t)
        self.extra_structure_ids = set(getattr(processor, "row_col_ids", None) or ())

    @property
    def structure_token_ids(self) -> set[int]:
        """The markers around images, the image token, and Idefics3's ``<row_i_col_j>`` tile
        tokens (when the tokenizer has them)."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return super().structure_token_ids | (self.extra_structure_ids - {unk, None})

    def render(self, messages, add_generation_prompt=False):
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text, images):
        out = self.processor(text=[text], images=[list(images)] if images else None,
                             return_tensors="pt")
        pixels = {k: v[0] for k, v in out.items() if k.startswith("pixel_")}
        return out["input_ids"][0].tolist(), pixels

    def pixels(self, images):
        if not images:
            return {}
        out = self.processor.image_processor(images=[list(images)], return_tensors="pt")
        return {k: v[0] for k, v in out.items() if k.startswith("pixel_")}

    def collate(self, pixels):
        if not any(pixels):
            return {}
        n = max(p["pixel_values"].shape[0] for p in pixels if p)
        out: dict[str, torch.Tensor] = {}
        for key in pixels[next(i for i, p in enumerate(pixels) if p)]:
            ref = next(p[key] for p in pixels if p)
            rows = []
            for p in pixels:
                t = p[key] if p else ref.new_zeros((0, *ref.shape[1:]))
                pad = t.new_zeros((n - t.shape[0], *t.shape[1:]))
                rows.append(torch.cat([t, pad]))
            out[key] = torch.stack(rows)
        return out

    def config(self):
        return json.loads(self.processor.to_json_string())


class PadExpandingProcessor(ImageTextProcessor):
    """Qwen2-VL layout: tokenizer + PIL image processor; ``<|image_pad|>`` expanded here.

    Pixels per sample are ``pixel_values [patches, C*T*P*P]`` and ``image_grid_thw
    [n_images, 3]``; :meth:`collate` concatenates both (images in sample order)."""

    image_token = "<|image_pad|>"
    structure_tokens = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))
        self.merge = int(image_processor.merge_size)

    def pixels(self, images):
        if not images:
            return {}
        return dict(self.image_processor(images=list(images), return_tensors="pt"))

    def encode(self, text, images):
        pixels = self.pixels(images)
        if images:
            counts = (pixels["image_grid_thw"].prod(-1) // self.merge ** 2).tolist()
            pieces = text.split(self.image_token)
            if len(pieces) - 1 != len(counts):
                raise ValueError(f"text has {len(pieces) - 1} {self.image_token} but "
                                 f"{len(counts)} images were given")
            text = pieces[0] + "".join(self.image_token * c + rest
                                       for c, rest in zip(counts, pieces[1:], strict=True))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids), pixels

    def collate(self, pixels):
        present = [p for p in pixels if p]
        if not present:
            return {}
        return {k: torch.cat([p[k] for p in present]) for k in present[0]}

    def config(self):
        return {"image_processor": self.image_processor.to_dict(), "image_token": self.image_token,
                "chat_template": self.tokenizer.chat_template}


def model_type(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["model_type"]


def load_processor(model_dir: str, *, trust_remote_code: bool = False) -> ImageTextProcessor:
    """The processor of the HF directory ``model_dir`` (offline)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if model_type(model_dir) in _PAD_EXPANDING:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        images = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        return PadExpandingProcessor(tok, images)
    return AutoImageTextProcessor(
        AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code))
