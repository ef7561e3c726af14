"""Teacher hidden states for image-text inputs, the building block of the VLM teacher cache.

The multimodal body (``model.base_model``: the vision tower, the connector and the language
model, no ``lm_head``) runs on a right-padded batch from :func:`kubedistill.vlm.inputs.collate`
with the positions of :func:`kubedistill.vlm.inputs.position_ids` (3-D M-RoPE where the model
has it). Its ``last_hidden_state`` is after the language model's final norm, so

    TeacherHead.from_model(model).logits(states[r]) == model(**sample_r).logits[0, positions[r]]

and only the states at loss positions are kept, exactly as the text ``hf`` engine does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kubedistill.vlm.inputs import forward_kwargs


@torch.inference_mode()
def image_text_final_states(model, batch: dict[str, torch.Tensor],
                            positions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Final post-norm hidden states ``[len(positions[r]), hidden]`` (float32, CPU) of each
    row ``r`` of ``batch`` at ``positions[r]``; no logits are computed."""
    if len(positions) != batch["input_ids"].shape[0]:
        raise ValueError(f"{len(positions)} position lists for a batch of "
                         f"{batch['input_ids'].shape[0]} rows")
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in forward_kwargs(model, batch).items()}
    hidden = model.base_model(**kwargs).last_hidden_state
    out = []
    for row, pos in enumerate(positions):
        index = torch.as_tensor(list(pos), dtype=torch.long, device=hidden.device)
        out.append(hidden[row].index_select(0, index).float().cpu())
    return out
