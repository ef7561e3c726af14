"""Vision-language models: processors, image-text inputs, positions (see docs/vlm.md)."""
