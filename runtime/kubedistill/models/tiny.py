"""Tiny randomly initialised models for fast tests (no weights to download).

``build_tiny_model(out_dir, tokenizer_ref=...)`` writes a Llama-architecture HF directory with
a small width and depth and the tokenizer (and chat template) of ``tokenizer_ref``, so tests
exercise real tokenization with a model that runs in milliseconds.
"""

from __future__ import annotations

import torch

from kubedistill.models.loading import load_tokenizer


def build_tiny_model(out_dir: str, *, tokenizer_ref: str, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     intermediate_size: int = 128, tie_word_embeddings: bool = True,
                     seed: int = 0, architecture: str = "llama") -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer(tokenizer_ref)
    config = AutoConfig.for_model(
        architecture, vocab_size=len(tok), hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
