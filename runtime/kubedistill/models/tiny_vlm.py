"""Tiny randomly initialised vision-language models for tests, built in code (nothing fetched).

Two families, each saved as an HF directory (config + safetensors + tokenizer + image
processor + chat template) that reloads offline:

- ``idefics3`` (the SmolVLM layout): ``Idefics3ForConditionalGeneration`` with
  ``Idefics3Processor`` + ``Idefics3ImageProcessorPil``; ``AutoProcessor`` and
  ``AutoModelForImageTextToText`` reload it. One image becomes
  ``<fake_token_around_image><global-img><image> x image_seq_len <fake_token_around_image>``
  with ``image_seq_len = (image_size / patch_size)^2 / scale_factor^2``.
- ``qwen2_vl`` (M-RoPE): ``Qwen2VLForConditionalGeneration`` with ``Qwen2VLImageProcessorPil``.
  ``Qwen2VLProcessor`` (and so ``AutoProcessor``) needs torchvision for its video processor,
  so :mod:`kubedistill.vlm.processing` expands ``<|image_pad|>`` itself to
  ``prod(image_grid_thw) / merge_size^2`` tokens.

The tokenizer is byte-level BPE with no merges (one token per byte, so any text encodes) plus
the family's special tokens; the chat template renders content-part messages in the
family's layout. Sizes are tiny (hidden 64, 2 layers, images resized to 28-56 px): a forward
takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch

FAMILIES = ("idefics3", "qwen2_vl")

# Our own templates: messages whose content is a list of {"type": "text"|"image"} parts.
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>"
    "{% else %} {{ p['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
_QWEN2_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_SPECIALS = {
    "idefics3": ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>",
                 "<fake_token_around_image>", "<image>", "<global-img>"],
    "qwen2_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
}
_EOS = {"idefics3": "<end_of_utterance>", "qwen2_vl": "<|im_end|>"}
_TEMPLATE = {"idefics3": _IDEFICS3_TEMPLATE, "qwen2_vl": _QWEN2_VL_TEMPLATE}


def byte_tokenizer(family: str, chat_template: str | None = None):
    """A byte-level tokenizer (256 byte tokens, no merges) with ``family``'s special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=_EOS[family],
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": _SPECIALS[family]})
    tok.chat_template = chat_template or _TEMPLATE[family]
    return tok


def _text_config(tok, hidden_size: int, num_layers: int) -> dict:
    return dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None)


def build_tiny_idefics3(out_dir: str, *, hidden_size: int = 64, num_layers: int = 2,
                        image_size: int = 32, patch_size: int = 8, scale_factor: int = 2,
                        seed: int = 0) -> str:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    tok = byte_tokenizer("idefics3")
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor ** 2
    images = Idefics3ImageProcessorPil(size={"longest_edge": image_size},
                                       max_image_size={"longest_edge": image_size},
                                       do_image_splitting=False)
    processor = Idefics3Processor(image_processor=images, tokenizer=tok,
                                  image_seq_len=image_seq_len, chat_template=tok.chat_template)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="llama", **_text_config(tok, hidden_size, num_layers)),
        scale_factor=scale_factor, image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_vl(out_dir: str, *, hidden_size: int = 64, num_layers: int = 2,
                        min_pixels: int = 28 * 28, max_pixels: int = 56 * 56,
                        seed: int = 0) -> str:
    """``mrope_section`` splits the rotary half-dimension ``head_dim / 2`` into (t, h, w)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = byte_tokenizer("qwen2_vl")
    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIALS["qwen2_vl"]}
    half = hidden_size // 4 // 2  # 4 heads
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = _text_config(tok, hidden_size, num_layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": section}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out_dir)
    return out_dir


def build_tiny_vlm(out_dir: str, family: str, **kwargs) -> str:
    """A tiny random VLM of ``family`` (one of :data:`FAMILIES`) saved at ``out_dir``."""
    builders = {"idefics3": build_tiny_idefics3, "qwen2_vl": build_tiny_qwen2_vl}
    if family not in builders:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose one of {FAMILIES}")
    return builders[family](out_dir, **kwargs)


def load_vlm(model_dir: str, dtype: torch.dtype = torch.float32):
    """An image-text-to-text model from an HF directory (offline, no remote code)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).eval()
