"""Which rows go where: dataset mixtures, the train/eval split, the length policy.

Mixture (:func:`mixture_plan`): without ``train_dataset_probs`` the datasets are
concatenated in order and the first ``max_samples`` rows kept. With probs, ``N =
min(max_samples, total rows)`` rows are drawn: dataset ``i`` gets ``round(p_i * N)`` of them
(largest remainder, so the counts add up to N), taken in a seeded random order; a dataset
asked for more rows than it has is cycled (each pass reshuffled) and the repeats counted;
then all picks are shuffled together. Everything is seeded with ``train.seed``.

Split (:func:`split_indices`): ``n_eval = min(eval_max_samples, max(1, round(n *
eval_ratio)))`` rows (0 when ``eval_ratio`` or ``eval_max_samples`` is 0; always leaving one
train row) chosen by a seeded permutation; both parts keep their order.

Length policy (:func:`fit_length`): the prompt is ``input_ids[:prompt_len]``. ``filter``
drops a sample whose prompt is longer than ``prompt_max_len`` or whose sequence is longer
than ``max_len``; ``truncate`` keeps the LAST ``prompt_max_len`` prompt tokens (the
generation header survives, the start of a long prompt does not) and then the FIRST
``max_len`` tokens; a sample left without targets is dropped. Every drop or cut is counted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from kubedistill.errors import ConfigError


def mixture_plan(sizes: Sequence[int], probs: Sequence[float] | None, max_samples: int,
                 seed: int) -> tuple[list[tuple[int, int, int]], dict]:
    """Picks ``(dataset, row index, repeat)`` and a summary (see the module docstring)."""
    total = sum(sizes)
    n = max(0, min(max_samples, total))
    if not probs:
        picks, left = [], n
        for d, size in enumerate(sizes):
            take = min(size, left)
            picks += [(d, i, 0) for i in range(take)]
            left -= take
        return picks, {"strategy": "concat", "rows": len(picks),
                       "per_dataset": [sum(p[0] == d for p in picks) for d in range(len(sizes))]}
    if len(probs) != len(sizes) or any(p < 0 for p in probs) or sum(probs) <= 0:
        raise ConfigError(f"train_dataset_probs {list(probs)} must be one non-negative weight "
                          f"per dataset ({len(sizes)}) with a positive sum")
    weights = [p / sum(probs) for p in probs]
    counts = [int(w * n) for w in weights]
    order = sorted(range(len(sizes)), key=lambda d: (-(weights[d] * n - counts[d]), d))
    for d in order[: n - sum(counts)]:
        counts[d] += 1
    rng = random.Random(seed)
    picks, repeats = [], [0] * len(sizes)
    for d, (size, count) in enumerate(zip(sizes, counts, strict=True)):
        if count and not size:
            raise ConfigError(f"dataset {d + 1} of the mixture has no usable rows")
        taken = 0
        while taken < count:
            perm = list(range(size))
            rng.shuffle(perm)
            rep = taken // size
            picks += [(d, i, rep) for i in perm[: count - taken]]
            taken += min(size, count - taken)
        repeats[d] = max(0, count - size)
    rng.shuffle(picks)
    return picks, {"strategy": "probs", "probs": weights, "rows": len(picks),
                   "per_dataset": counts, "repeated": repeats}


def split_indices(n: int, eval_ratio: float, eval_max_samples: int,
                  seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices) over ``range(n)`` (see the module docstring)."""
    if n == 0 or eval_ratio <= 0 or eval_max_samples <= 0:
        return list(range(n)), []
    n_eval = min(eval_max_samples, max(1, round(n * eval_ratio)), n - 1)
    picked = set(random.Random(seed).sample(range(n), n_eval))
    return ([i for i in range(n) if i not in picked], [i for i in range(n) if i in picked])


class LengthFiltered(Exception):
    """The sample is dropped by the length policy; ``reason`` is the counter's name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def fit_length(ids: list[int], mask: list[int], prompt_len: int, *, max_len: int,
               prompt_max_len: int, policy: str, events: list[str],
               ) -> tuple[list[int], list[int], int]:
    """Apply the length policy; appends ``truncated_*`` to ``events``, raises LengthFiltered."""
    prompt_max_len = max(1, prompt_max_len)
    if prompt_len > prompt_max_len:
        if policy == "filter":
            raise LengthFiltered("filtered_prompt_too_long")
        cut = prompt_len - prompt_max_len
        ids, mask, prompt_len = ids[cut:], mask[cut:], prompt_max_len
        events.append("truncated_prompt")
    if len(ids) > max_len:
        if policy == "filter":
            raise LengthFiltered("filtered_too_long")
        ids, mask = ids[:max_len], mask[:max_len]
        events.append("truncated")
        if 1 not in mask:
            raise LengthFiltered("filtered_no_target_left")
    return ids, mask, prompt_len
