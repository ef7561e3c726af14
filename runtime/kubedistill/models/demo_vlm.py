"""The demo VLM teacher: an Idefics3 (SmolVLM layout) whose language model is SmolLM2.

``build_smollm2_idefics3(out_dir, text_dir=...)`` takes an HF Llama directory (the packaged
SmolLM2-135M-Instruct) and writes an ``Idefics3ForConditionalGeneration`` directory:

- every tensor of the text model is copied into ``model.text_model.*`` (SmolVLM-256M's text
  backbone has exactly SmolLM2-135M's shapes; see docs/vlm.md);
- the tokenizer gains Idefics3's image tokens (``<fake_token_around_image>``, ``<image>``,
  ``<global-img>``, ``<end_of_utterance>``); their new embedding rows are the mean of the
  existing rows, so the text vocabulary's logits are unchanged;
- ``lm_head`` is untied (Idefics3's default) and starts as a copy of the resized embedding;
- the vision tower (SigLIP layout, default B/16 at 512 px, ``scale_factor`` 4, so 64 image
  tokens per image) and the connector are **randomly initialised**.

``packaged:smollm2-idefics3-demo`` (:func:`ensure_demo_vlm`) builds it once into the model
cache from ``packaged:smollm2-135m-instruct`` with :data:`DEMO_VISION`: the SigLIP-B/16
block shape, but 4 blocks at 256 px (256 patches, 16 image tokens per image), so the
recipe runs on CPU. (SmolVLM-256M itself uses 12 blocks at 512 px and 64 image tokens.)

This teacher does not understand images: it exercises real-scale text on real images (token
counts, memory, throughput, cache sizes), not quality. Its chat template is SmolLM2's ChatML
with ``{"type": "image"}`` parts rendered as ``<image>``.
"""

from __future__ import annotations

import torch

_IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
_CHATML_WITH_IMAGES = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIGLIP_B16_512 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, image_size=512, patch_size=16)


DEMO_VISION = dict(SIGLIP_B16_512, num_hidden_layers=4, image_size=256)
DEMO_NAME = "smollm2-idefics3-demo"


def ensure_demo_vlm(cache_dir: str | None = None) -> str:
    """The directory of ``packaged:smollm2-idefics3-demo``, built on first use (about 30 s)
    beside its final place and renamed into it, so a crash leaves no half model."""
    import os
    import shutil
    import tempfile

    from kubedistill.models.packaged import ensure_imported, model_cache_dir

    root = model_cache_dir(cache_dir)
    final = os.path.join(root, DEMO_NAME)
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    text_dir = ensure_imported("smollm2-135m-instruct", cache_dir)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{DEMO_NAME}-") as tmp:
        build_smollm2_idefics3(os.path.join(tmp, "model"), text_dir=text_dir,
                               vision=DEMO_VISION)
        if not os.path.exists(os.path.join(final, "config.json")):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(tmp, "model"), final)
    return final


def build_smollm2_idefics3(out_dir: str, *, text_dir: str, vision: dict | None = None,
                           scale_factor: int = 4, seed: int = 0) -> str:
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    vision = dict(vision or SIGLIP_B16_512)
    text = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(text_dir)
    old_vocab = text.get_input_embeddings().weight.shape[0]
    tok.add_special_tokens({"additional_special_tokens": _IMAGE_TOKENS},
                           replace_extra_special_tokens=False)
    tok.chat_template = _CHATML_WITH_IMAGES
    size = vision["image_size"]
    images = Idefics3ImageProcessorPil(size={"longest_edge": size},
                                       max_image_size={"longest_edge": size},
                                       do_image_splitting=False)
    image_seq_len = (size // vision["patch_size"]) ** 2 // scale_factor ** 2
    processor = Idefics3Processor(image_processor=images, tokenizer=tok,
                                  image_seq_len=image_seq_len, chat_template=_CHATML_WITH_IMAGES)
    text_config = text.config.to_dict()
    text_config.update(vocab_size=len(tok))
    config = Idefics3Config(text_config=text_config, vision_config=vision,
                            scale_factor=scale_factor, tie_word_embeddings=False,
                            image_token_id=tok.convert_tokens_to_ids("<image>"),
                            pad_token_id=text.config.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    embed = text.get_input_embeddings().weight.detach()
    resized = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tok) - old_vocab, -1)])
    body = {k: v for k, v in text.model.state_dict().items() if k != "embed_tokens.weight"}
    missing, unexpected = model.model.text_model.load_state_dict(
        {**body, "embed_tokens.weight": resized}, strict=False)
    if missing or unexpected:
        raise ValueError(f"text weights do not fit Idefics3: missing {missing}, "
                         f"unexpected {unexpected}")
    with torch.no_grad():
        model.lm_head.weight.copy_(resized)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
