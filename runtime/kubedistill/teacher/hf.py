"""The ``hf`` teacher engine: transformers on any device, no logits computed.

Runs the base model (``model.base_model``, i.e. ``model.model`` for Llama/Qwen/Gemma), whose
``last_hidden_state`` is already after the final norm, so
``TeacherHead.from_model(model).logits(h) == model(x).logits``. Samples are sorted by length
(longest first) and grouped so that ``rows x longest`` stays within ``batch_tokens``
(a sample longer than the budget runs alone); batches are right-padded with an attention
mask, under ``torch.inference_mode``. Samples with no positions are not run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

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


class HFTeacherEngine(EngineLifecycle):
    def __init__(self, model: nn.Module, batch_tokens: int = 4096):
        self.model = model.eval()
        self.body = model.base_model
        self.batch_tokens = int(batch_tokens)
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def final_states(self, sequences: Sequence[Sequence[int]],
                     positions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [torch.zeros(len(p), self.hidden_size) for p in positions]
        todo = [i for i, p in enumerate(positions) if len(p)]
        for group in token_budget_batches([len(sequences[i]) for i in todo], self.batch_tokens):
            rows = [todo[g] for g in group]
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

    def _shutdown(self) -> None:  # sleep / wake: nothing to release (EngineLifecycle)
        self.model = self.body = None
