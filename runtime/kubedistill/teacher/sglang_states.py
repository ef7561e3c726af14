"""Pure helpers of the ``sglang`` teacher: request grouping under a token budget, and the
strict reading of ``meta_info["hidden_states"]``.

Why both (read in SGLang's ``scheduler_output_processor_mixin.process_batch_result_prefill``):
a request whose prefill crosses ``chunked_prefill_size`` (or that the batch adder cuts to fit
the remaining prefill budget) is chunked; its hidden states are appended only in the step
where ``req.is_chunked`` reaches 0, sliced as ``hidden_states[offset : offset +
len(origin_input_ids)]`` out of a batch that holds only that LAST chunk's rows, so the
request gets rows of the requests after it and, since the offset is not advanced for the
chunked request in its earlier steps, older builds shift every later request of the batch.
The teacher engine therefore (1) runs with ``chunked_prefill_size=-1`` (no chunking) and
``max_prefill_tokens`` = its token budget, (2) sends at most a budget's worth of tokens per
``generate`` call (:func:`budget_groups`), and (3) accepts a result only if it holds exactly
one block of exactly ``n_tokens`` rows (:func:`prefill_states`).

``max_new_tokens=0`` is enough for hidden states: in the prefill step SGLang appends the
sampled token, ``check_finished`` then ends the request (``len(output_ids) >=
max_new_tokens``), and the prefill block is appended in that same step (no decode step runs,
so no per-token blocks follow). ``benchmarks/sglang_check.py`` compares 0 with 1 on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kubedistill.errors import KubedistillError


def budget_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive index groups whose token sums stay within ``max_tokens`` (a longer
    request alone); every index appears exactly once, in order."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if groups and total + n <= max_tokens:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def prefill_states(hidden: Any, n_tokens: int, hidden_size: int) -> torch.Tensor:
    """``meta_info["hidden_states"]`` -> ``[n_tokens, d]`` float32.

    Exactly one block (the prefill) of exactly ``n_tokens`` rows of ``hidden_size``; a
    single-token prompt may come as one flat row. Anything else is an error that says what
    came back (extra rows mean a chunked or shifted request, extra blocks decode steps).
    """
    if not isinstance(hidden, (list, tuple)) or len(hidden) != 1:
        count = len(hidden) if isinstance(hidden, (list, tuple)) else type(hidden).__name__
        raise KubedistillError(f"sglang returned {count} hidden-state blocks for a "
                               f"{n_tokens}-token prompt; expected exactly one prefill block "
                               f"(max_new_tokens=0, no chunked prefill)")
    block = torch.as_tensor(hidden[0], dtype=torch.float32)
    if block.dim() == 1 and n_tokens == 1:
        block = block[None]
    if block.dim() != 2 or tuple(block.shape) != (n_tokens, hidden_size):
        raise KubedistillError(f"sglang returned a hidden-state block of shape "
                               f"{tuple(block.shape)} for a {n_tokens}-token prompt; expected "
                               f"({n_tokens}, {hidden_size}) (a chunked prefill?)")
    return block
