"""Batched greedy generation from token prompts (left-padded), decoded to text."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def greedy_generate(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, batch_size: int = 8, device: str = "cpu",
                    desc: str = "generate") -> list[str]:
    """Greedy continuations of each prompt (token ids), decoded without special tokens.

    Prompts are left-padded within a batch so that every continuation starts at the same
    column; the output order matches ``prompts``.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for k, i in enumerate(idx):
                n = len(prompts[i])
                ids[k, width - n:] = torch.as_tensor(list(prompts[i]), dtype=torch.long)
                attn[k, width - n:] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, num_beams=1)
            for k, i in enumerate(idx):
                outputs[i] = tokenizer.decode(out[k, width:].tolist(), skip_special_tokens=True)
    return outputs
