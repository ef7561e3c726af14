"""Models: loading (HF directory, GGUF file, packaged name), packaged real models, students
derived from a teacher, tiny random models for tests."""

from kubedistill.models.loading import (
    load_causal_lm,
    load_tokenizer,
    resolve_attn_implementation,
    resolve_model_path,
)

__all__ = ["load_causal_lm", "load_tokenizer", "resolve_attn_implementation",
           "resolve_model_path"]
